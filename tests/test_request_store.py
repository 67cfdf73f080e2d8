"""RequestStore: the transition table, add/pop rules, and check_invariants() catching each kind
of inconsistency on an otherwise consistent store."""

from __future__ import annotations

import itertools

import pytest

from alignedserve.batcher.request import TRANSITIONS, Request, RequestState, RequestStore
from alignedserve.common.sampling_params import SamplingParams

S = RequestState
BLOCK_TOKENS = 16
POOL_BLOCKS = 64
ALL_PAIRS = list(itertools.product(S, S))


def make_request(request_id: str = "r", prompt: int = 20, max_tokens: int = 8, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return Request(request_id, range(prompt), params, arrival_s=0.0, **kw)


# ---- transitions ------------------------------------------------------------------------------


def test_table_covers_every_state():
    assert set(TRANSITIONS) == set(S)
    assert all(targets <= set(S) for targets in TRANSITIONS.values())


@pytest.mark.parametrize(
    ("old", "new"), ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS]
)
def test_transition(old, new):
    store = RequestStore()
    request = make_request(state=old)
    store.add(request)
    if new in TRANSITIONS[old]:
        store.transition(request, new)
        assert request.state is new
    else:
        with pytest.raises(RuntimeError) as err:
            store.transition(request, new)
        assert old.value in str(err.value) and new.value in str(err.value)
        assert f"{old.value} -> {new.value}" in str(err.value)
        assert request.state is old  # a refused move changes nothing


def test_done_states_are_terminal():
    for state in S:
        assert state.is_done == (state in (S.FINISHED, S.ABORTED))
        assert (not TRANSITIONS[state]) == state.is_done
    # every live state can reach a done one (abort), so no request is stuck forever
    for state in S:
        if not state.is_done:
            assert S.ABORTED in TRANSITIONS[state]


def test_lifecycle_through_the_pool():
    store = RequestStore()
    request = make_request()
    store.add(request)
    for state in (S.POOLED, S.PREFETCHING, S.RUNNING, S.POOLED, S.RUNNING, S.FINISHED):
        store.transition(request, state)
    assert request.state is S.FINISHED


# ---- add / get / pop / queries ----------------------------------------------------------------


def test_add_get_duplicate():
    store = RequestStore()
    first = make_request("a")
    store.add(first)
    with pytest.raises(KeyError):
        store.add(make_request("a", prompt=5))
    assert store.get("a") is first and len(store) == 1 and "a" in store
    with pytest.raises(KeyError):
        store.get("b")


def done_request(request_id: str = "r", state: RequestState = S.FINISHED) -> Request:
    return make_request(request_id, state=state, finished_s=1.0)


@pytest.mark.parametrize("state", [S.FINISHED, S.ABORTED])
def test_pop_done_request(state):
    store = RequestStore()
    store.add(done_request("a", state))
    assert store.pop("a").request_id == "a"
    assert "a" not in store and len(store) == 0
    with pytest.raises(KeyError):
        store.pop("a")


@pytest.mark.parametrize("state", [s for s in S if not s.is_done])
def test_pop_live_request_raises(state):
    store = RequestStore()
    store.add(make_request("a", state=state))
    with pytest.raises(RuntimeError, match=state.value):
        store.pop("a")


def test_pop_done_request_holding_blocks_raises():
    store = RequestStore()
    store.add(make_request("a", state=S.FINISHED, finished_s=1.0, blocks=[3]))
    with pytest.raises(RuntimeError):
        store.pop("a")


@pytest.mark.parametrize("holding_blocks", [False, True])
def test_refused_pop_keeps_the_request(holding_blocks):
    store = RequestStore()
    if holding_blocks:
        request = make_request("a", state=S.FINISHED, finished_s=1.0, blocks=[3])
    else:
        request = make_request("a", state=S.RUNNING)
    store.add(request)
    with pytest.raises(RuntimeError):
        store.pop("a")
    assert "a" in store and store.get("a") is request


def test_count_by_state_and_in_state():
    store = RequestStore()
    states = [S.POOLED, S.POOLED, S.RUNNING, S.WAITING_PREFILL, S.FINISHED]
    for i, state in enumerate(states):
        store.add(make_request(f"r{i}", state=state))
    counts = store.count_by_state()
    assert counts[S.POOLED] == 2 and counts[S.RUNNING] == 1 and counts[S.ABORTED] == 0
    assert [r.request_id for r in store.in_state(S.POOLED)] == ["r0", "r1"]
    assert [r.request_id for r in store] == [f"r{i}" for i in range(5)]


def test_the_store_counts_its_live_requests_tokens():
    store = RequestStore()
    store.add(make_request("a", prompt=20))
    store.add(make_request("b", prompt=5))
    assert store.num_live_tokens == 25
    store.append_token(store.get("a"), 7)
    assert store.num_live_tokens == 26 and store.get("a").output_token_ids == [7]
    store.transition(store.get("a"), S.ABORTED)
    assert store.num_live_tokens == 5  # its 21 tokens left with it


def test_kv_token_counts():
    request = make_request(prompt=20)
    assert request.num_tokens == 20 and request.num_kv_tokens == 0
    request.output_token_ids.append(7)
    assert request.num_tokens == 21 and request.num_kv_tokens == 20  # last token not yet in KV
    request.output_token_ids.append(8)
    assert request.num_kv_tokens == 21


# ---- check_invariants -------------------------------------------------------------------------


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_TOKENS)


def consistent_store() -> RequestStore:
    """One request in every state, each holding what its KV needs, blocks all distinct."""
    store = RequestStore()
    next_block = itertools.count()

    def take(n: int) -> list[int]:
        return [next(next_block) for _ in range(n)]

    # waiting, half prefilled (a chunked prefill reserved blocks for what it computed)
    store.add(make_request("waiting", prompt=40, num_prefilled=20, blocks=take(blocks_for(20))))
    store.add(make_request("fresh", prompt=40))  # waiting, nothing computed, no blocks
    # past prefill: prompt 20 + 3 outputs -> 22 KV tokens; room for the next: 23 -> 2 blocks
    for name, state in (("pooled", S.POOLED), ("prefetch", S.PREFETCHING), ("run", S.RUNNING)):
        request = make_request(name, prompt=20, state=state, output_token_ids=[1, 2, 3])
        request.blocks = take(blocks_for(request.num_kv_tokens + 1))
        store.add(request)
    # KV exactly fills 2 blocks: 2 (no room yet) or 3 (room for the next token) are both fine
    exact = make_request("exact", prompt=31, state=S.POOLED, output_token_ids=[1, 2])
    assert exact.num_kv_tokens == 32
    exact.blocks = take(2)
    store.add(exact)
    full = make_request(
        "full", prompt=20, max_tokens=3, state=S.RUNNING, output_token_ids=[1, 2, 3]
    )
    full.blocks = take(2)
    store.add(full)
    store.add(done_request("finished", S.FINISHED))
    store.add(done_request("aborted", S.ABORTED))
    return store


def test_consistent_store_passes():
    store = consistent_store()
    store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)
    assert {r.state for r in store} == set(S)


def test_consistent_store_with_room_block_passes():
    store = consistent_store()
    store.get("exact").blocks.append(POOL_BLOCKS - 1)  # 3 blocks for 32 KV tokens + next
    store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)


def corrupt_block_owned_twice(store):
    store.get("run").blocks.append(store.get("pooled").blocks[0])
    store.get("run").blocks.pop(0)  # keep the count right: only the sharing is wrong


def corrupt_block_repeated_in_one_request(store):
    blocks = store.get("run").blocks
    blocks[1] = blocks[0]


def corrupt_block_past_the_pool(store):
    store.get("pooled").blocks[-1] = POOL_BLOCKS


def corrupt_negative_block(store):
    store.get("pooled").blocks[-1] = -1


def corrupt_finished_holding_blocks(store):
    store.get("finished").blocks = [POOL_BLOCKS - 1]


def corrupt_aborted_holding_blocks(store):
    store.get("aborted").blocks = [POOL_BLOCKS - 1]


def corrupt_pooled_too_few_blocks(store):
    store.get("pooled").blocks.pop()  # 1 block for 22 KV tokens


def corrupt_pooled_too_many_blocks(store):
    store.get("pooled").blocks.append(POOL_BLOCKS - 1)  # 3 blocks for 22 KV tokens (+1)


def corrupt_exact_too_many_blocks(store):
    store.get("exact").blocks += [POOL_BLOCKS - 1, POOL_BLOCKS - 2]  # 4 blocks for 32 (+1)


def corrupt_running_too_few_blocks(store):
    store.get("run").blocks.pop()


def corrupt_prefetching_too_many_blocks(store):
    store.get("prefetch").blocks.append(POOL_BLOCKS - 1)


def corrupt_pooled_kv_grew(store):
    store.get("pooled").output_token_ids += [4] * BLOCK_TOKENS  # a block's worth more KV


def corrupt_output_past_max_tokens(store):
    store.get("full").output_token_ids.append(4)  # 4 outputs, max_tokens=3; blocks still fit


def corrupt_waiting_prefilled_without_blocks(store):
    store.get("waiting").blocks.pop()


def corrupt_live_tokens_not_counted(store):
    store.num_live_tokens += 1  # a token counted that no live request holds


def corrupt_done_without_finish_time(store):
    store.get("aborted").finished_s = None


CORRUPTIONS = [f for name, f in sorted(globals().items()) if name.startswith("corrupt_")]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_check_invariants_catches(corrupt):
    store = consistent_store()
    corrupt(store)
    with pytest.raises(AssertionError):
        store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)


def test_invariant_messages_name_the_culprit():
    store = consistent_store()
    corrupt_block_owned_twice(store)
    with pytest.raises(AssertionError, match="owned by pooled and run"):
        store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)
    store = consistent_store()
    corrupt_pooled_too_few_blocks(store)
    with pytest.raises(AssertionError, match="pooled: 1 blocks for 22 KV tokens"):
        store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)
    store = consistent_store()
    corrupt_finished_holding_blocks(store)
    with pytest.raises(AssertionError, match="finished is finished but holds blocks"):
        store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)
    store = consistent_store()
    corrupt_block_past_the_pool(store)
    with pytest.raises(AssertionError, match=f"block {POOL_BLOCKS} outside the pool"):
        store.check_invariants(BLOCK_TOKENS, POOL_BLOCKS)
