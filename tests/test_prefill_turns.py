"""The decode GPU's prefill turns beside a prefill device (scheduler/turns.py): when a turn
is taken, and that their time stays within the configured share of the decode GPU's."""

from __future__ import annotations

import pytest

from alignedserve.batcher.scheduler import SchedulerConfig, make_scheduler
from alignedserve.batcher.scheduler.turns import PrefillShare
from alignedserve.common.errors import ConfigError
from alignedserve.common.sampling_params import SamplingParams

from factories import drive

TURN_TOKENS = 512


def test_a_turn_that_stretched_residents_is_paid_back_by_decode_steps():
    share = PrefillShare(0.25)  # turns may take a quarter: each decode second pays 1/3 s
    assert share.may_take(decodes=True)
    share.took()
    assert not share.may_take(decodes=False)  # one turn unanswered at a time
    share.observe(is_turn=True, decoded=True, seconds=0.3)
    assert share.debt_s == pytest.approx(0.3)
    assert not share.may_take(decodes=True) and share.may_take(decodes=False)
    share.observe(is_turn=False, decoded=True, seconds=0.6)  # pays 0.2
    assert share.debt_s == pytest.approx(0.1) and not share.may_take(decodes=True)
    share.observe(is_turn=False, decoded=False, seconds=5.0)  # decoded nothing: pays nothing
    assert share.debt_s == pytest.approx(0.1)
    share.observe(is_turn=False, decoded=True, seconds=0.3)
    assert share.debt_s == 0.0 and share.may_take(decodes=True)


def test_a_turn_while_nothing_decodes_costs_nothing_and_a_lost_turn_frees_the_slot():
    share = PrefillShare(0.5)
    share.took()
    share.observe(is_turn=True, decoded=False, seconds=0.4)
    assert share.debt_s == 0.0 and share.may_take(decodes=True)
    share.took()
    share.steps_lost()  # the worker died with it in flight: it is never answered
    assert share.may_take(decodes=True)


def test_share_zero_never_takes_a_turn_and_bad_shares_are_refused():
    assert not PrefillShare(0.0).may_take(decodes=False)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="decode_prefill_share"):
            SchedulerConfig(decode_prefill_share=bad)
        with pytest.raises(ValueError, match="share"):
            PrefillShare(bad)


def make(share: float, **kw):
    config = SchedulerConfig(
        policy="aligned",
        block_tokens=16,
        num_pool_blocks=200_000,
        gpu_kv_tokens=1 << 20,
        num_prefill_device_blocks=1024,
        prefill_tokens_per_step=TURN_TOKENS,
        decode_prefill_share=share,
        **kw,
    )
    return make_scheduler(config)


def add(sched, n: int, prompt: int, max_tokens: int, now: float = 0.0, start: int = 0):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(start, start + n):
        sched.add_request(f"r{i}", range(1, prompt + 1), params, now=now)


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_turns_come_while_a_backlog_waits_and_keep_to_their_share(share):
    """A long backlog of prompts (far more than the prefill device clears) beside residents
    that decode: the decode GPU takes full-batch turns, and the time of those that stretched
    residents' steps stays within share / (1 - share) of its other decode time (give or
    take the last turn, whose debt is not yet paid)."""
    sched = make(share)
    add(sched, 400, prompt=100, max_tokens=2000)
    plans, in_turns, decoding = drive(sched, 600, turn_s=0.2, decode_s=0.01)
    turns = [p for p in plans if p.mixed_prefill]
    assert len(turns) > 5
    # a turn is a full batch: as many prompt tokens as the prefill device's
    assert all(sum(n for _, n in p.mixed_prefill) > TURN_TOKENS - 100 for p in turns[:-1])
    assert in_turns > 0 and decoding > 0
    assert in_turns <= share / (1 - share) * decoding + 0.2 + 1e-9
    # and while the backlog lasts, the share is used: a turn comes once the last is paid
    paid = share / (1 - share) * drive.decoding_before_last_turn
    assert paid <= in_turns + 0.2, (paid, in_turns)


def test_no_turns_without_a_backlog_or_with_share_zero():
    """Prompts that the prefill device keeps up with (a few per step, less than a turn's
    batch waiting unplanned) leave the decode GPU to decode; share 0 never prefills there
    even under a long backlog."""

    def trickle(step, now):
        if step % 4 == 0:
            add(sched, 1, prompt=100, max_tokens=50, now=now, start=step)

    sched = make(0.5)
    plans, _, _ = drive(sched, 400, turn_s=0.2, decode_s=0.01, arrivals=trickle)
    assert sum(bool(p.decode) for p in plans) > 100
    assert not any(p.mixed_prefill for p in plans)

    sched = make(0.0)
    add(sched, 400, prompt=100, max_tokens=2000)
    plans, _, _ = drive(sched, 300, turn_s=0.2, decode_s=0.01)
    assert sum(bool(p.decode) for p in plans) > 100
    assert not any(p.mixed_prefill for p in plans)


def test_no_turns_while_the_pool_holds_more_than_the_decode_gpu_has_room_for():
    """When prefilled requests already wait in the pool for room on the decode GPU, the GPU's
    room, not prefill, limits its batch: a turn would only lengthen the wait."""
    sched = make(0.5, max_resident_kv_fraction=0.01, growth_tokens=16)
    room = int(0.01 * (1 << 20))  # tokens of KV the residents may hold
    add(sched, 3000, prompt=100, max_tokens=2000)
    pooled_counts = []

    def watch(step, now):
        pooled_counts.append(len(sched.policy.pooled))

    plans, _, _ = drive(sched, 600, turn_s=0.2, decode_s=0.01, arrivals=watch)
    # from the step on which the pool holds more than the whole room (116 tokens each)
    full = next((i for i, n in enumerate(pooled_counts) if n * 116 > room), None)
    assert full is not None, "the pool never filled up"
    assert any(p.mixed_prefill for p in plans[:full]), "no turn before it filled"
    assert plans[full:] and not any(p.mixed_prefill for p in plans[full:])
