"""KVM's binary statistics (KVM_GET_STATS_FD) of a VM or vCPU, read as {name: value}.

The fd holds a header, one descriptor per statistic and a data block; descriptors are read
once, the data block on every `read`. Only single-value statistics are returned (histograms
are skipped). Counters such as `pf_taken`, `pf_fast`, `pf_fixed` and `exits` (vCPU) tell
which fault path a workload went through.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable

from .abi import KVM_GET_STATS_FD

__all__ = ["Stats", "delta"]

# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset
_HEADER = struct.Struct("<6I")
# struct kvm_stats_desc: flags, exponent, size, offset, bucket_size, then name[name_size]
_DESC = struct.Struct("<IhHII")


class Stats:
    """An open statistics fd of one VM or vCPU fd; `close` it when done."""

    def __init__(self, kvm_object_fd: int) -> None:
        self._fd = fcntl.ioctl(kvm_object_fd, KVM_GET_STATS_FD)
        _, name_size, count, _, desc_offset, self._data_offset = _HEADER.unpack(
            os.pread(self._fd, _HEADER.size, 0))
        stride = _DESC.size + name_size
        raw = os.pread(self._fd, stride * count, desc_offset)
        self._fields: list[tuple[str, int]] = []
        self._data_size = 0
        for i in range(count):
            _, _, size, offset, _ = _DESC.unpack_from(raw, i * stride)
            name = raw[i * stride + _DESC.size:(i + 1) * stride].split(b"\0", 1)[0].decode()
            self._data_size = max(self._data_size, offset + 8 * size)
            if size == 1:
                self._fields.append((name, offset))

    def read(self) -> dict[str, int]:
        data = os.pread(self._fd, self._data_size, self._data_offset)
        return {name: int.from_bytes(data[off:off + 8], "little") for name, off in self._fields}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def delta(before: dict[str, int], after: dict[str, int], names: Iterable[str]
          ) -> dict[str, int]:
    """How much each counter of `names` that `after` has grew since `before`."""
    return {name: after[name] - before[name] for name in names if name in after}
