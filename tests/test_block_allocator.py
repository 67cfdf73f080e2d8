"""BlockAllocator: a model-based property test over random allocate/free sequences, plus the
edge cases the property test cannot reach cheaply (a million blocks, partial bad frees)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import OutOfBlocksError

MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def free_set_by_draining(alloc: BlockAllocator) -> set[int]:
    """The blocks the allocator would hand out now, observed through its public API only:
    allocate every free block, then give them back (restoring the state)."""
    n = alloc.num_free
    blocks = alloc.allocate(n)
    assert len(blocks) == n
    alloc.free(blocks)
    assert alloc.num_free == n
    return set(blocks)


class AllocatorMachine(RuleBasedStateMachine):
    """Compares BlockAllocator with a plain model: the set of blocks each caller owns."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc: BlockAllocator
        self.allocations: list[list[int]] = []  # what callers hold, as handed out
        self.ever_freed: set[int] = set()

    @initialize(num_blocks=st.integers(1, 24))
    def make(self, num_blocks: int) -> None:
        self.alloc = BlockAllocator(num_blocks)

    @property
    def owned(self) -> set[int]:
        return {b for blocks in self.allocations for b in blocks}

    def snapshot(self) -> tuple[int, int, set[int]]:
        return self.alloc.num_free, self.alloc.num_used, free_set_by_draining(self.alloc)

    # ---- rules -------------------------------------------------------------------------

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, self.alloc.num_blocks + 2), label="n")
        before_free = self.alloc.num_free
        if n > before_free:
            before = self.snapshot()
            with pytest.raises(OutOfBlocksError):
                self.alloc.allocate(n)
            assert self.snapshot() == before, "a refused allocation changed the allocator"
            return
        blocks = self.alloc.allocate(n)
        assert len(blocks) == n
        assert len(set(blocks)) == n, f"one block handed out twice in one call: {blocks}"
        assert all(0 <= b < self.alloc.num_blocks for b in blocks)
        assert not set(blocks) & self.owned, "handed out a block somebody already owns"
        assert self.alloc.num_free == before_free - n
        if blocks:
            self.allocations.append(blocks)

    @precondition(lambda self: self.allocations)
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        """Free a whole allocation, or a shuffled subset of it (callers trim their tails)."""
        i = data.draw(st.integers(0, len(self.allocations) - 1), label="allocation")
        blocks = self.allocations[i]
        chosen = data.draw(st.lists(st.sampled_from(blocks), unique=True, min_size=1))
        before_free = self.alloc.num_free
        self.alloc.free(chosen)
        assert self.alloc.num_free == before_free + len(chosen)
        rest = [b for b in blocks if b not in chosen]
        if rest:
            self.allocations[i] = rest
        else:
            del self.allocations[i]
        self.ever_freed |= set(chosen)

    @rule(data=st.data())
    def free_invalid(self, data: st.DataObject) -> None:
        """Double free, never-allocated block, or out of range: ValueError, state intact."""
        n = self.alloc.num_blocks
        not_owned = sorted(set(range(n)) - self.owned)
        candidates = [-1, n, n + 7]
        candidates += not_owned  # in range but free: never allocated or already freed
        candidates += sorted(self.ever_freed - self.owned)  # explicit double frees
        bad = data.draw(st.sampled_from(candidates), label="bad block")
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.alloc.free([bad])
        assert self.snapshot() == before, f"freeing bad block {bad} changed the allocator"

    @precondition(lambda self: self.allocations)
    @rule(data=st.data())
    def free_list_with_a_bad_entry(self, data: st.DataObject) -> None:
        """Owned blocks plus one bad entry (anywhere in the list) are rejected whole."""
        n = self.alloc.num_blocks
        owned = sorted(self.owned)
        good = data.draw(st.lists(st.sampled_from(owned), unique=True, min_size=1), label="good")
        bad = data.draw(
            st.sampled_from([-1, n, *good, *sorted(set(range(n)) - self.owned)]), label="bad"
        )  # out of range, a duplicate of a good entry, or a free block
        at = data.draw(st.integers(0, len(good)), label="at")
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.alloc.free([*good[:at], bad, *good[at:]])
        assert self.snapshot() == before, "a rejected free list changed the allocator"

    @rule()
    def drain_and_restore(self) -> None:
        """The free list holds exactly the blocks nobody owns (checked by draining it)."""
        expected = set(range(self.alloc.num_blocks)) - self.owned
        assert free_set_by_draining(self.alloc) == expected

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def counts_add_up(self) -> None:
        owned = [b for blocks in self.allocations for b in blocks]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert self.alloc.num_free + len(owned) == self.alloc.num_blocks
        assert self.alloc.num_used == len(owned)
        assert self.alloc.usage == pytest.approx(len(owned) / self.alloc.num_blocks)
        assert self.alloc.can_allocate(self.alloc.num_free)
        assert not self.alloc.can_allocate(self.alloc.num_free + 1)


def test_random_allocate_free_sequences():
    run_state_machine_as_test(AllocatorMachine, settings=MACHINE_SETTINGS)


# ---- plain tests ---------------------------------------------------------------------------


def test_allocate_and_free_a_million_blocks_in_chunks():
    n, chunk = 1_000_000, 4096
    alloc = BlockAllocator(n)
    chunks = []
    while alloc.num_free:
        chunks.append(alloc.allocate(min(chunk, alloc.num_free)))
    flat = [b for c in chunks for b in c]
    assert len(flat) == n
    assert set(flat) == set(range(n))
    assert alloc.num_used == n and alloc.usage == 1.0
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(1)
    for c in reversed(chunks[::2]):  # free half the chunks, out of order, then the rest
        alloc.free(c)
    for c in chunks[1::2]:
        alloc.free(c)
    assert alloc.num_free == n and alloc.num_used == 0
    assert sorted(alloc.allocate(n)) == list(range(n))


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_needs_at_least_one_block(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(num_blocks)


def test_out_of_blocks_error_is_503_and_says_how_many_are_free():
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    with pytest.raises(OutOfBlocksError, match="1 free") as exc:
        alloc.allocate(2)
    assert exc.value.http_status == 503
    assert alloc.num_free == 1


def test_freed_blocks_are_reused_first():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    alloc.allocate(2)
    alloc.free(a)
    assert set(alloc.allocate(3)) == set(a)


@pytest.mark.parametrize(
    "bad_tail",
    [
        pytest.param(lambda held: [held[0], 99], id="valid-then-out-of-range"),
        pytest.param(lambda held: [held[0], held[1], held[0]], id="duplicate-in-one-call"),
        pytest.param(lambda held: [held[0], 3], id="valid-then-never-allocated"),
    ],
)
def test_bad_free_list_is_rejected_atomically(bad_tail):
    alloc = BlockAllocator(4)
    held = alloc.allocate(2)  # blocks 3 and 2 remain free
    before = free_set_by_draining(alloc)
    with pytest.raises(ValueError):
        alloc.free(bad_tail(held))
    assert alloc.num_free == 2
    assert free_set_by_draining(alloc) == before
    alloc.free(held)  # the caller still owns its blocks and can give them back
    assert alloc.num_free == 4


def test_runs_go_out_ascending_and_come_back_whole():
    """kv_cache.copy_blocks copies a run of consecutive ids on both sides as one transfer."""
    alloc = BlockAllocator(16)
    a, b = alloc.allocate(3), alloc.allocate(2)
    assert (a, b) == ([0, 1, 2], [3, 4])
    alloc.free(b)
    assert alloc.allocate(2) == [3, 4]
    alloc.free(a)
    assert alloc.allocate(5) == [0, 1, 2, 5, 6]  # the freed run first, then fresh ones
