"""Packed access batches, built on the client side (the layout of AccessBatch in vcpu.proto).

    batch = (BatchBuilder()
             .write(0x1000, data=b"12345678")     # moves data
             .read(0x1000, 8, with_data=True)     # its bytes come back in read_data
             .read(0x2000)                         # a pure translation: faults, A/D, no data
             .build())

A batch is three byte strings: `gpas` (one little-endian u64 per access), `ops` (one op
byte per access: kind in bits 0-1, log2 of the size in bits 2-3, WITH_DATA in bit 4) and
`write_data` (the bytes of the WITH_DATA writes, in order); the op byte OP_HLT (0x20, gpa
0) is HLT. The builder only encodes; the
server decides what is a valid access (page crossing, batch length, ...).
"""

from __future__ import annotations

import enum
import sys
from array import array
from dataclasses import dataclass

__all__ = ["Access", "WITH_DATA", "OP_HLT", "op_byte", "Batch", "BatchBuilder"]

WITH_DATA = 1 << 4
OP_HLT = 1 << 5                  # the op byte of HLT, which is no access
_LOG2_SIZE = {1: 0, 2: 1, 4: 2, 8: 3}

class Access(enum.IntEnum):
    """The kind of an access, as bits 0-1 of its op byte."""

    READ = 1
    WRITE = 2
    EXEC = 3


def op_byte(kind: Access, size: int, with_data: bool) -> int:
    """The op byte of one access."""
    if size not in _LOG2_SIZE:
        raise ValueError(f"access size {size} is not 1, 2, 4 or 8")
    return kind | _LOG2_SIZE[size] << 2 | (WITH_DATA if with_data else 0)


@dataclass(frozen=True, slots=True)
class Batch:
    """A packed batch, exactly as it travels."""

    gpas: bytes
    ops: bytes
    write_data: bytes = b""

    def __len__(self) -> int:
        return len(self.ops)


class BatchBuilder:
    """Appends accesses in order; `build()` packs them into a `Batch`."""

    def __init__(self) -> None:
        self._gpas = array("Q")
        self._ops = bytearray()
        self._write_data = bytearray()

    def __len__(self) -> int:
        return len(self._ops)

    def read(self, gpa: int, size: int = 8, *, with_data: bool = False) -> BatchBuilder:
        """A read of `size` bytes; with `with_data` its bytes come back in `read_data`."""
        return self._add(gpa, op_byte(Access.READ, size, with_data))

    def write(self, gpa: int, size: int | None = None, *, data: bytes | None = None
              ) -> BatchBuilder:
        """A write that stores `data`, or without data a pure translation of `size` bytes
        (8 unless given)."""
        if data is None:
            return self._add(gpa, op_byte(Access.WRITE, 8 if size is None else size, False))
        if size is not None and size != len(data):
            raise ValueError(f"size {size} disagrees with the {len(data)} bytes of data")
        self._add(gpa, op_byte(Access.WRITE, len(data), True))
        self._write_data += data
        return self

    def fetch(self, gpa: int, size: int = 1) -> BatchBuilder:
        """An instruction fetch of `size` bytes (a translation for execute)."""
        return self._add(gpa, op_byte(Access.EXEC, size, False))

    def hlt(self) -> BatchBuilder:
        """HLT: the run ends here with ExitReason.HLT; a resume goes on after it."""
        return self._add(0, OP_HLT)

    def _add(self, gpa: int, op: int) -> BatchBuilder:
        self._gpas.append(gpa)
        self._ops.append(op)
        return self

    def build(self) -> Batch:
        gpas = array("Q", self._gpas)
        if sys.byteorder == "big":
            gpas.byteswap()
        return Batch(gpas.tobytes(), bytes(self._ops), bytes(self._write_data))
