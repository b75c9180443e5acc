"""The packed access batch: what `from_wire` rejects, and the TLB keys it precomputes."""

from __future__ import annotations

import errno
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmu.server.kvm import OP_WITH_DATA, AccessBatch, AccessKind, KvmError, make_op
from vmmu.server.kvm.batch import tlb_keys

R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.EXEC
READ8 = make_op(R, 8, False)


def gpas(*values):
    return struct.pack(f"<{len(values)}Q", *values)


def rejected(*args, **kwargs) -> str:
    with pytest.raises(KvmError) as err:
        AccessBatch.from_wire(*args, **kwargs)
    assert err.value.errno == errno.EINVAL
    return err.value.reason


@pytest.mark.parametrize("op, kind, size, with_data", [
    (0x01, R, 1, False), (0x06, W, 2, False), (0x0B, X, 4, False), (0x1D, R, 8, True),
    (0x12, W, 1, True),
])
def test_op_byte_layout(op, kind, size, with_data):
    assert make_op(kind, size, with_data) == op


def test_round_trip_through_the_wire():
    batch = AccessBatch.build([(0x1000, W, 4, b"abcd"), (0x2FFF, R, 1, None),
                               (0x3008, X, 8, b"")])
    wire = batch.to_wire()
    assert wire == (gpas(0x1000, 0x2FFF, 0x3008), bytes([0x1A, 0x01, 0x1F]), b"abcd")
    again = AccessBatch.from_wire(*wire)
    assert list(again.gpas) == [0x1000, 0x2FFF, 0x3008] and len(again) == 3


def test_empty_batch():
    assert "empty" in rejected(b"", b"")


def test_more_than_max_accesses():
    n = AccessBatch.MAX_ACCESSES + 1
    assert "more than" in rejected(bytes(8 * n), bytes([READ8]) * n)


def test_max_accesses_is_accepted():
    n = AccessBatch.MAX_ACCESSES
    assert len(AccessBatch.from_wire(bytes(8 * n), bytes([READ8]) * n)) == n


@pytest.mark.parametrize("gpa_bytes", [7, 9, 16, 0])
def test_gpas_length_must_match_the_ops(gpa_bytes):
    rejected(bytes(gpa_bytes), bytes([READ8]))


@pytest.mark.parametrize("op", [0x00, 0x0C, 0x10])          # kind 0 with any size or data
def test_unknown_kind(op):
    assert "kind" in rejected(gpas(0x1000, 0x2000), bytes([READ8, op]))


@pytest.mark.parametrize("reserved", [1 << 5, 1 << 6, 1 << 7])
def test_reserved_bits(reserved):
    assert "reserved" in rejected(gpas(0x1000), bytes([READ8 | reserved]))


@pytest.mark.parametrize("gpa, size", [(0xFFC, 8), (0x1FFF, 2), (0x2FFD, 4), (0xFF9, 8)])
def test_crossing_a_page(gpa, size):
    reason = rejected(gpas(0x5000, gpa), bytes([READ8, make_op(R, size, False)]))
    assert "crosses" in reason and f"{gpa:#x}" in reason


@pytest.mark.parametrize("gpa, size", [(0xFF8, 8), (0xFFE, 2), (0xFFC, 4), (0xFFF, 1)])
def test_accesses_ending_at_the_page_end_are_fine(gpa, size):
    assert len(AccessBatch.from_wire(gpas(gpa), bytes([make_op(R, size, False)]))) == 1


@given(offset=st.integers(0, 0xFFF), size=st.sampled_from([1, 2, 4, 8]),
       page=st.integers(0, (1 << 40) - 1), position=st.integers(0, 9))
@settings(max_examples=300, deadline=None)
def test_crossing_is_exactly_offset_plus_size_beyond_the_page(offset, size, page, position):
    addrs = [0x7000] * 10
    addrs[position] = page << 12 | offset
    ops = bytes([READ8]) * 10
    ops = ops[:position] + bytes([make_op(R, size, False)]) + ops[position + 1:]
    crosses = offset + size > 0x1000
    if crosses:
        rejected(gpas(*addrs), ops)
    else:
        assert len(AccessBatch.from_wire(gpas(*addrs), ops)) == 10


@pytest.mark.parametrize("data", [b"", b"abc", b"abcde"])
def test_write_data_must_match_the_data_writes(data):
    assert "write_data" in rejected(gpas(0x1000, 0x2000),
                                    bytes([make_op(W, 4, True), make_op(R, 4, True)]), data)


def test_write_data_without_data_writes():
    rejected(gpas(0x1000), bytes([make_op(W, 4, False)]), b"abcd")


@pytest.mark.parametrize("gpa, max_gpa", [(1 << 52, 1 << 52), ((1 << 64) - 1, 1 << 52),
                                          (1 << 48, 1 << 48), (1 << 63, 1 << 48)])
def test_gpa_beyond_the_width(gpa, max_gpa):
    assert "width" in rejected(gpas(0x1000, gpa), bytes([READ8, READ8]), max_gpa=max_gpa)


@given(gpa=st.integers(0, (1 << 64) - 1), bits=st.integers(36, 52))
@settings(max_examples=300, deadline=None)
def test_width_check_matches_arithmetic(gpa, bits):
    gpa &= ~0xFFF                                          # keep the access page-safe
    wire = (gpas(gpa), bytes([READ8]))
    if gpa >> bits:
        rejected(*wire, max_gpa=1 << bits)
    else:
        assert list(AccessBatch.from_wire(*wire, max_gpa=1 << bits).gpas) == [gpa]


def test_build_rejects_a_bad_size():
    with pytest.raises(KvmError) as err:
        AccessBatch.build([(0x1000, R, 3, None)])
    assert err.value.errno == errno.EINVAL


@given(accesses=st.lists(st.tuples(st.integers(0, (1 << 64) - 1), st.sampled_from([R, W, X]),
                                   st.sampled_from([0, 4, 8, 12, OP_WITH_DATA])),
                         min_size=1, max_size=32))
@settings(max_examples=150, deadline=None)
def test_tlb_keys_are_gfn_and_kind(accesses):
    addrs = [gpa for gpa, _, _ in accesses]
    ops = bytes(int(kind) | flags for _, kind, flags in accesses)
    keys = tlb_keys(array("Q", addrs), ops)
    assert list(keys) == [((gpa >> 12) << 4) | (op & 3) for gpa, op in zip(addrs, ops)]


@given(addrs=st.lists(st.integers(0, (1 << 52) - 1), min_size=1, max_size=32),
       kind=st.sampled_from([R, W, X]))
@settings(max_examples=100, deadline=None)
def test_a_wire_batch_carries_the_same_keys(addrs, kind):
    addrs = [a & ~7 for a in addrs]
    batch = AccessBatch.from_wire(gpas(*addrs), bytes([make_op(kind, 8, False)]) * len(addrs))
    assert list(batch.tlb_keys) == [(a >> 12) << 4 | kind for a in addrs]
