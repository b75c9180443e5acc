"""A batch of guest accesses in the packed form it travels in (docs/model-api.md).

    gpas        little-endian u64 per access
    ops         one byte per access: bits 0-1 kind (1 read, 2 write, 3 fetch),
                bits 2-3 log2(size), bit 4 WITH_DATA; the rest must be zero; or
                OP_HLT (0x20) alone: the guest halts there (its gpa must be 0)
    write_data  the bytes of every WITH_DATA write, in order

Validation happens once, here, before anything runs: a rejected batch changes nothing.
"""

from __future__ import annotations

import sys
from array import array
from typing import Iterable

import numpy as np

from .errors import einval
from .types import AccessKind

__all__ = ["AccessBatch", "OP_KIND_MASK", "OP_SIZE_SHIFT", "OP_WITH_DATA", "OP_HLT", "make_op",
           "op_size", "tlb_keys"]

OP_KIND_MASK = 0x3
OP_SIZE_SHIFT = 2
OP_SIZE_MASK = 0x3 << OP_SIZE_SHIFT
OP_WITH_DATA = 1 << 4
OP_HLT = 1 << 5                  # not an access: HLT, which ends the run (KVM_EXIT_HLT)
_OP_VALID = OP_KIND_MASK | OP_SIZE_MASK | OP_WITH_DATA


def make_op(kind: AccessKind, size: int, with_data: bool) -> int:
    return int(kind) | ((size.bit_length() - 1) << OP_SIZE_SHIFT) | \
        (OP_WITH_DATA if with_data else 0)


class AccessBatch:
    MAX_ACCESSES = 1 << 20

    # A run must average this many accesses for `runs` to offer them: below, a loop over
    # the accesses costs less than one over the runs plus finding them.
    RUN_MIN = 4

    __slots__ = ("gpas", "ops", "write_data", "tlb_keys", "has_data", "_runs")

    def __init__(self, gpas: array, ops: bytes, write_data: bytes) -> None:
        self.gpas, self.ops, self.write_data = gpas, ops, write_data
        self.tlb_keys = tlb_keys(gpas, ops)
        self.has_data = ops.translate(_WITH_DATA).find(1) >= 0
        self._runs: list[int] | None | bool = False

    def runs(self) -> list[int] | None:
        """The batch cut into contiguous runs: accesses with the same op, each starting
        where the one before it ended, in the same page (so with one TLB key, one pfn, and
        bytes that move in one copy). The index where each run starts, then len(batch);
        None when runs average fewer than RUN_MIN accesses. Found once per batch."""
        if self._runs is False:
            gpas = np.frombuffer(self.gpas, dtype=np.uint64)
            ops = np.frombuffer(self.ops, dtype=np.uint8)
            ends = gpas[:-1] + _SIZES[ops[:-1]]
            joins = (gpas[1:] == ends) & ((gpas[1:] >> 12) == (gpas[:-1] >> 12)) & \
                (ops[1:] == ops[:-1])
            starts = np.flatnonzero(~joins) + 1
            n = len(ops)
            self._runs = None if (len(starts) + 1) * self.RUN_MIN > n else \
                [0] + starts.tolist() + [n]
        return self._runs

    def __len__(self) -> int:
        return len(self.gpas)

    @classmethod
    def from_wire(cls, gpas: bytes, ops: bytes, write_data: bytes = b"",
                  max_gpa: int = 1 << 52) -> "AccessBatch":
        if not ops:
            raise einval("the batch is empty")
        if len(ops) > cls.MAX_ACCESSES:
            raise einval(f"{len(ops)} accesses is more than the {cls.MAX_ACCESSES} a batch "
                         "may hold")
        if len(gpas) != 8 * len(ops):
            raise einval(f"gpas holds {len(gpas)} bytes, {8 * len(ops)} expected for "
                         f"{len(ops)} ops")
        addrs = array("Q")
        addrs.frombytes(gpas)
        if sys.byteorder == "big":
            addrs.byteswap()
        batch = cls(addrs, bytes(ops), bytes(write_data))
        batch._validate(max_gpa)
        return batch

    @classmethod
    def build(cls, accesses: Iterable[tuple[int, int, int, bytes | None]],
              max_gpa: int = 1 << 52) -> "AccessBatch":
        """From (gpa, kind, size, data or None) tuples."""
        gpas, ops, data = array("Q"), bytearray(), bytearray()
        for gpa, kind, size, payload in accesses:
            if size not in (1, 2, 4, 8):
                raise einval(f"access size {size} is not 1, 2, 4 or 8")
            gpas.append(gpa)
            with_data = payload is not None
            ops.append(make_op(AccessKind(kind), size, with_data))
            if with_data and kind == AccessKind.WRITE:
                data += payload
        if not ops:
            raise einval("the batch is empty")
        batch = cls(gpas, bytes(ops), bytes(data))
        batch._validate(max_gpa)
        return batch

    def to_wire(self) -> tuple[bytes, bytes, bytes]:
        gpas = array("Q", self.gpas)
        if sys.byteorder == "big":
            gpas.byteswap()
        return gpas.tobytes(), self.ops, self.write_data

    def _validate(self, max_gpa: int) -> None:
        """Byte-string operations only (C speed): the batch is checked before it runs."""
        ops, n = self.ops, len(self.ops)
        bad = ops.translate(_INVALID_OP).find(1)
        if bad >= 0:
            op = ops[bad]
            raise einval(f"op {op:#04x} of access {bad} "
                         + ("sets reserved bits" if op & ~_OP_VALID else
                            "has no access kind (1 read, 2 write, 3 fetch)"))
        hlt = ops.find(OP_HLT)
        while hlt >= 0:
            if self.gpas[hlt]:
                raise einval(f"the HLT at {hlt} has gpa {self.gpas[hlt]:#x}, not 0")
            hlt = ops.find(OP_HLT, hlt + 1)
        raw = self.gpas.tobytes() if sys.byteorder == "little" else self.to_wire()[0]
        bits = max_gpa.bit_length() - 1
        for k in range(bits // 8, 8):
            column = raw[k::8]
            if k == bits // 8 and bits % 8:
                column = column.translate(_at_least(1 << (bits % 8)))
            if column.count(0) != n:
                i = next(i for i, b in enumerate(column) if b)
                raise einval(f"gpa {self.gpas[i]:#x} of access {i} is beyond the guest "
                             f"physical address width ({bits} bits)")
        page_top = None
        for size, (is_size, low_byte_crosses) in _CROSSING.items():
            sized = ops.translate(is_size)
            if sized.find(1) < 0:
                continue
            if page_top is None:
                page_top = int.from_bytes(raw[1::8].translate(_LOW_NIBBLE_FULL), "little")
            crossing = page_top & int.from_bytes(sized, "little") & \
                int.from_bytes(raw[0::8].translate(low_byte_crosses), "little")
            if crossing:
                i = (crossing & -crossing).bit_length() // 8
                raise einval(f"the {size}-byte access {i} at gpa {self.gpas[i]:#x} crosses "
                             "a page")
        needed = 0
        if ops.translate(_DATA_WRITE).find(1) >= 0:
            needed = sum(size * ops.translate(table).count(1)
                         for size, table in _DATA_WRITE_OF_SIZE.items())
        if needed != len(self.write_data):
            raise einval(f"write_data holds {len(self.write_data)} bytes, the WITH_DATA "
                         f"writes need {needed}")


def _table(predicate) -> bytes:
    """A `bytes.translate` table: 1 where predicate(byte), else 0."""
    return bytes(int(bool(predicate(b))) for b in range(256))


def _at_least(threshold: int) -> bytes:
    return _table(lambda b: b >= threshold)



def op_size(op: int) -> int:
    return 1 << ((op & OP_SIZE_MASK) >> OP_SIZE_SHIFT)


def tlb_keys(gpas: array, ops: bytes) -> array:
    """The TLB key of every access, `gfn << 4 | kind`, computed with byte slicing.

    On a little-endian host the key is gpa >> 8 (drop byte 0) with the low nibble
    replaced by the kind: a copy and two strided writes instead of a Python loop.
    """
    keys = array("Q")
    if sys.byteorder != "little":
        keys.extend(((gpa >> 12) << 4) | (op & OP_KIND_MASK) for gpa, op in zip(gpas, ops))
        return keys
    raw, n = gpas.tobytes(), len(ops)
    out = bytearray(raw[1:])
    out.append(0)
    out[7::8] = bytes(n)               # the byte each key borrowed from the next gpa
    low = int.from_bytes(raw[1::8].translate(_HIGH_NIBBLE), "little") | \
        int.from_bytes(ops.translate(_KIND), "little")
    out[0::8] = low.to_bytes(n, "little")
    keys.frombytes(out)
    return keys


_SIZES = np.array([op_size(op) for op in range(256)], dtype=np.uint64)
_HIGH_NIBBLE = bytes(b & 0xF0 for b in range(256))
_KIND = bytes(b & OP_KIND_MASK for b in range(256))
_INVALID_OP = _table(lambda op: op != OP_HLT and (op & ~_OP_VALID or not op & OP_KIND_MASK))
_WITH_DATA = _table(lambda op: op & OP_WITH_DATA)
_LOW_NIBBLE_FULL = _table(lambda b: b & 0xF == 0xF)
# size -> (ops of that size, low gpa bytes that cross a page when bits 8-11 are all set)
_CROSSING = {size: (_table(lambda op, s=size: op_size(op) == s), _at_least(256 - size + 1))
             for size in (2, 4, 8)}
_DATA_WRITE = _table(lambda op: op & OP_WITH_DATA and op & OP_KIND_MASK == AccessKind.WRITE)
_DATA_WRITE_OF_SIZE = {
    size: _table(lambda op, s=size: op_size(op) == s and op & OP_WITH_DATA
                 and op & OP_KIND_MASK == AccessKind.WRITE)
    for size in (1, 2, 4, 8)}
