"""The prefill pacer: beside a decoding batch, a step's prefill is what the prefill device
computes in one decode step's time, within its bounds; with nothing to decode, all of it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignedserve.batcher.prefill_pacer import PrefillPacer


def test_full_budget_until_both_rates_are_known_and_while_nothing_decodes():
    pacer = PrefillPacer(max_tokens=8192)
    assert pacer.budget(decoding=True) == 8192  # nothing measured yet
    pacer.observe(8192, prefill_s=0.2, decoding=False, compute_s=0.0)  # 40,960 tokens/s
    assert pacer.budget(decoding=True) == 8192  # no decode step measured yet
    pacer.observe(0, prefill_s=0.0, decoding=True, compute_s=0.025)
    assert pacer.budget(decoding=True) == 1024  # 40,960 tokens/s x 25 ms
    assert pacer.budget(decoding=False) == 8192


def test_the_budget_follows_the_measured_rates_and_stays_in_bounds():
    pacer = PrefillPacer(max_tokens=4096, min_tokens=256, smoothing=1.0)  # newest sample only
    pacer.observe(2000, prefill_s=0.05, decoding=True, compute_s=0.01)  # 40k/s, 10 ms
    assert pacer.budget(decoding=True) == 400
    pacer.observe(400, prefill_s=0.1, decoding=True, compute_s=0.005)  # 4k/s, 5 ms: 20
    assert pacer.budget(decoding=True) == 256  # the floor keeps chunks worth a pass
    pacer.observe(4000, prefill_s=0.01, decoding=True, compute_s=0.05)  # 400k/s, 50 ms
    assert pacer.budget(decoding=True) == 4096


def test_a_step_with_a_mixed_chunk_does_not_count_as_a_decode_step():
    pacer = PrefillPacer(max_tokens=8192, smoothing=1.0)
    pacer.observe(1000, prefill_s=0.025, decoding=True, compute_s=0.02)  # 40k/s, 20 ms
    pacer.observe(0, prefill_s=0.0, decoding=False, compute_s=0.2)  # decode + a mixed chunk
    assert pacer.budget(decoding=True) == 800


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_averages_move_towards_new_samples(smoothing):
    pacer = PrefillPacer(max_tokens=100_000, min_tokens=1, smoothing=smoothing)
    pacer.observe(1000, prefill_s=0.1, decoding=True, compute_s=0.01)  # 10k/s x 10 ms
    pacer.observe(3000, prefill_s=0.1, decoding=True, compute_s=0.01)  # 30k/s
    expected_rate = 10_000 + smoothing * 20_000
    assert pacer.budget(decoding=True) == int(expected_rate * 0.01)


@given(
    samples=st.lists(
        st.tuples(
            st.integers(0, 20_000),
            st.floats(0, 1),
            st.booleans(),
            st.floats(0, 1),
        ),
        max_size=20,
    ),
    max_tokens=st.integers(1, 16_384),
    decoding=st.booleans(),
)
def test_the_budget_is_always_within_bounds(samples, max_tokens, decoding):
    pacer = PrefillPacer(max_tokens=max_tokens)
    for tokens, prefill_s, is_decode, compute_s in samples:
        pacer.observe(tokens, prefill_s, is_decode, compute_s)
    budget = pacer.budget(decoding)
    assert min(512, max_tokens) <= budget <= max_tokens
    if not decoding:
        assert budget == max_tokens
