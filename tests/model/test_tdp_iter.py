"""The TDP iterator over a hand-built 4-level tree: order, ranges, min_level, restart."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import spte as S
from vmmu.server.kvm.mmu_page import PageTables
from vmmu.server.kvm.tdp_iter import TdpIter, last_spte
from vmmu.server.kvm.types import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, level_shift

HIGH = 1 << 27                # the first gfn under the root's entry 1

# (level, gfn) of every leaf; tables on their paths are built as needed.
LEAVES = [(PG_LEVEL_4K, 3), (PG_LEVEL_4K, 5), (PG_LEVEL_2M, 0x200), (PG_LEVEL_1G, 0x40000),
          (PG_LEVEL_4K, HIGH)]

# Every present SPTE of that tree, in the order a pre-order walk must visit them.
PRESENT_IN_ORDER = [
    (4, 0, "table"), (3, 0, "table"), (2, 0, "table"), (1, 3, "leaf"), (1, 5, "leaf"),
    (2, 0x200, "leaf"), (3, 0x40000, "leaf"),
    (4, HIGH, "table"), (3, HIGH, "table"), (2, HIGH, "table"), (1, HIGH, "leaf"),
]


@pytest.fixture
def tree():
    return build(4, LEAVES)


def build(root_level, leaves):
    tables = PageTables()
    root = tables.alloc(root_level, 0, 0, is_root=True)
    for level, gfn in leaves:
        page = root
        while page.level > level:
            index = (gfn >> level_shift(page.level)) & 511
            spte = page.spt[index]
            if not S.is_shadow_present(spte):
                child = tables.alloc(page.level - 1, gfn & ~((1 << level_shift(page.level)) - 1),
                                     0)
                page.spt[index] = S.make_nonleaf(child.pfn, True)
                page.children[index] = child           # as the doors record a link
            page = tables.child(S.spte_to_pfn(page.spt[index]))
        page.spt[(gfn >> level_shift(level)) & 511] = S.make_leaf(
            0x900000 + gfn, level, host_writable=True, writable=True, ad_enabled=True)
    return tables, root


def present(steps):
    return [(level, gfn, S.describe(spte, level)) for level, gfn, spte in steps
            if S.is_shadow_present(spte)]


def walk(tables, root, start, end, min_level=PG_LEVEL_4K):
    return [(it.level, it.gfn, it.old_spte)
            for it in TdpIter(root, start, end, min_level)]


def test_full_walk_is_pre_order(tree):
    steps = walk(*tree, 0, 1 << 36)
    assert present(steps) == PRESENT_IN_ORDER


def test_full_walk_visits_every_entry_of_every_table_once(tree):
    tables, root = tree
    steps = walk(tables, root, 0, 1 << 36)
    assert len(steps) == 512 * len(tables)                # 7 tables
    assert len({(level, gfn) for level, gfn, _ in steps}) == len(steps)


def test_every_visited_gfn_is_aligned_to_its_level(tree):
    for level, gfn, _ in walk(*tree, 0, 1 << 36):
        assert gfn % (1 << level_shift(level)) == 0


def test_range_starting_and_ending_mid_table(tree):
    steps = walk(*tree, 4, 0x201)
    assert present(steps) == [(4, 0, "table"), (3, 0, "table"), (2, 0, "table"),
                              (1, 5, "leaf"), (2, 0x200, "leaf")]
    fours = [gfn for level, gfn, _ in steps if level == PG_LEVEL_4K]
    assert fours == list(range(4, 512))                   # from the start gfn to the table's end
    assert max(gfn for _, gfn, _ in steps) == 0x200       # nothing at or beyond end


def test_range_inside_a_huge_page_yields_the_huge_leaf(tree):
    assert present(walk(*tree, 0x250, 0x251)) == [(4, 0, "table"), (3, 0, "table"),
                                                  (2, 0x200, "leaf")]


def test_range_over_unmapped_gfns_stops_at_the_empty_entry(tree):
    steps = walk(*tree, HIGH + 512, HIGH + 1024)
    assert present(steps) == [(4, HIGH, "table"), (3, HIGH, "table")]
    assert steps[-1][:2] == (PG_LEVEL_2M, HIGH + 512) and steps[-1][2] == S.NONPRESENT


@pytest.mark.parametrize("min_level, deepest", [(PG_LEVEL_2M, 2), (PG_LEVEL_1G, 3), (4, 4)])
def test_min_level_stops_the_descent(tree, min_level, deepest):
    steps = walk(*tree, 0, 1 << 36, min_level)
    assert min(level for level, _, _ in steps) == deepest
    assert present(steps) == [p for p in PRESENT_IN_ORDER if p[0] >= min_level]


def test_restart_after_yield_resumes_at_next_last_level_gfn(tree):
    tables, root = tree
    it = TdpIter(root, 0, 1 << 36)
    seen = []
    for step in it:
        seen.append((step.level, step.gfn))
        if (step.level, step.gfn) == (PG_LEVEL_4K, 5):
            break
    assert it.next_last_level_gfn == 5
    it.mark_yielded()
    it.next()
    assert (it.level, it.gfn, it.yielded, it.yielded_gfn) == (4, 0, False, 5)
    rest = present([(i.level, i.gfn, i.old_spte) for i in it])
    # The path down to gfn 5 is walked again from the root, then the walk goes on.
    assert rest == [(4, 0, "table"), (3, 0, "table"), (2, 0, "table"), (1, 5, "leaf"),
                    (2, 0x200, "leaf"), (3, 0x40000, "leaf"), (4, HIGH, "table"),
                    (3, HIGH, "table"), (2, HIGH, "table"), (1, HIGH, "leaf")]
    assert (PG_LEVEL_4K, 3) in seen and (PG_LEVEL_4K, 3) not in [r[:2] for r in rest]


def test_restart_from_an_upper_level_entry(tree):
    tables, root = tree
    it = TdpIter(root, 0, 1 << 36)
    for step in it:
        if (step.level, step.gfn) == (PG_LEVEL_2M, 0x200):
            break
    it.mark_yielded()
    it.next()
    rest = present([(i.level, i.gfn, i.old_spte) for i in it])
    assert rest[:4] == [(4, 0, "table"), (3, 0, "table"), (2, 0x200, "leaf"),
                        (3, 0x40000, "leaf")]


def test_step_down_rereads_the_spte(tree):
    """A table zapped after the iterator read it is not descended into."""
    tables, root = tree
    it = TdpIter(root, 0, 1 << 36)
    for step in it:
        if (step.level, step.gfn) == (PG_LEVEL_2M, 0):
            break
    assert S.describe(it.old_spte, PG_LEVEL_2M) == "table"
    it.table.spt[it.index] = S.NONPRESENT
    it.next()
    assert (it.level, it.gfn) == (PG_LEVEL_2M, 0x200)


def test_far_step_down_takes_every_step_to_the_leaf_in_one_call(tree):
    tables, root = tree
    it = TdpIter(root, 5, 6)
    assert it.step_down(far=True)
    assert (it.level, it.gfn, S.describe(it.old_spte, it.level)) == (PG_LEVEL_4K, 5, "leaf")
    assert [page.level for page in it.pt_path[1:]] == [1, 2, 3, 4]
    assert it.table is it.pt_path[PG_LEVEL_4K] and it.index == 5
    assert not it.step_down(far=True)                    # nothing below a 4K leaf


@pytest.mark.parametrize("start, min_level, stop", [
    (5, PG_LEVEL_2M, (PG_LEVEL_2M, 0, "table")),          # min_level
    (0x250, PG_LEVEL_4K, (PG_LEVEL_2M, 0x200, "leaf")),   # a huge leaf
    (HIGH + 512, PG_LEVEL_4K, (PG_LEVEL_2M, HIGH + 512, "non-present")),
])
def test_far_step_down_stops_where_a_single_step_would(tree, start, min_level, stop):
    tables, root = tree
    far = TdpIter(root, start, start + 1, min_level)
    assert far.step_down(far=True)
    near = TdpIter(root, start, start + 1, min_level)
    while near.step_down():
        pass
    for it in (far, near):
        assert (it.level, it.gfn, S.describe(it.old_spte, it.level)) == stop
    assert far.pt_path == near.pt_path and far.index == near.index
    assert not far.step_down(far=True)


@pytest.mark.parametrize("root_level", [4, 5])
def test_last_spte_stops_where_a_one_gfn_walk_ends(root_level):
    """The lockless walk finds what the iterator over [gfn, gfn + 1) ends on: the leaf, or
    the first SPTE that is not present; beyond the root's reach, no SPTE at all."""
    reach = 1 << level_shift(root_level + 1)
    leaves = LEAVES + ([(PG_LEVEL_4K, 1 << 36 | 9)] if root_level == 5 else [])
    tables, root = build(root_level, leaves)
    probes = {gfn + delta for _, gfn in leaves for delta in (0, 1, 512)} | {7, reach - 1}
    for gfn in sorted(probes):
        end = next((it.level, it.old_spte) for it in TdpIter(root, gfn, gfn + 1)
                   if not S.is_shadow_present(it.old_spte) or S.is_last(it.old_spte, it.level))
        table, index, level, spte = last_spte(root, gfn)
        assert (level, spte) == end, hex(gfn)
        assert table.spt[index] == spte and table.level == level, hex(gfn)
    for gfn in (reach, reach + 5, reach | 3 << 27):
        assert last_spte(root, gfn) == (root, -1, root_level, S.NONPRESENT), hex(gfn)
