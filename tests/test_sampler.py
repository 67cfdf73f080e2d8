"""Sampling: the sampler's distributions and seeding, SamplingParams validation, finish
reasons, and the runtime's decode loop end to end on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import InvalidRequestError, OutOfBlocksError
from alignedserve.common.sampling_params import SamplingParams, finish_reason
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.sampler import sample
from alignedserve.worker.tiny import EOS, EOT, init_tiny

from factories import greedy

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and spinning OpenMP workers slow these tests
    down many times over when other test runs share the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def sp(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 16, **kw})


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int) -> np.ndarray:
    """n seeded draws from one distribution: the same row sampled at positions 0..n-1."""
    tokens, _ = sample(logits_row.expand(n, -1).clone(), [params] * n, list(range(n)))
    return tokens.numpy()


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Independent reference: temperature, then min-p (tokens below min_p x the top
    probability dropped), then top-k, then the smallest nucleus with mass >= top_p,
    renormalised."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), dtype=bool)
    k = top_k if 0 < top_k < len(p) else len(p)
    kept = p[order[:k]] / p[order[:k]].sum()
    mass = 0.0
    for idx, q in zip(order[:k], kept, strict=True):
        if mass >= top_p:
            break
        keep[idx] = True
        mass += q
    out = np.where(keep, p, 0.0)
    return out / out.sum()


# ---- greedy and logprobs --------------------------------------------------------------------


def test_greedy_rows_return_argmax_and_model_logprob():
    logits = random_logits(8)
    tokens, logprobs = sample(logits, [sp(temperature=0.0)] * 8, list(range(8)))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


@pytest.mark.parametrize(
    "params",
    [
        sp(temperature=0.0),
        sp(temperature=1.0, seed=1),
        sp(temperature=0.3, seed=2),
        sp(temperature=3.0, seed=3),
        sp(temperature=1.0, top_k=3, seed=4),
        sp(temperature=0.7, top_p=0.5, seed=5),
        sp(temperature=1.0),  # unseeded
    ],
    ids=["greedy", "t1", "t0.3", "t3", "topk3", "t0.7-topp0.5", "unseeded"],
)
def test_logprob_is_under_the_unprocessed_distribution(params):
    """Temperature/top-k/top-p shape the draw, never the reported logprob."""
    logits = random_logits(16, seed=7)
    tokens, logprobs = sample(logits, [params] * 16, list(range(16)))
    assert tokens.shape == logprobs.shape == (16,)
    assert ((tokens >= 0) & (tokens < VOCAB)).all()
    expected = torch.log_softmax(logits, -1)[torch.arange(16), tokens]
    torch.testing.assert_close(logprobs, expected)


def test_half_precision_logits_give_float32_logprobs():
    logits = random_logits(4).to(torch.bfloat16)
    tokens, logprobs = sample(logits, [sp(temperature=0.0)] * 4, [0] * 4)
    assert logprobs.dtype == torch.float32
    assert tokens.tolist() == logits.float().argmax(-1).tolist()


# ---- seeding ----------------------------------------------------------------------------------


OTHER_ROWS = [
    sp(temperature=0.0),
    sp(temperature=1.0),  # unseeded: consumes the global generator
    sp(temperature=0.5, seed=99),
    sp(temperature=1.0, top_k=2, seed=7),
    sp(temperature=2.0, top_p=0.3, seed=123),
]


@pytest.mark.parametrize("index", [0, 2, 5])
def test_seeded_draw_ignores_batch_mates_and_row_index(index):
    target = sp(temperature=1.0, seed=1234)
    target_logits = random_logits(1, seed=1)[0] * 0.2  # flat: many tokens are likely
    others = random_logits(len(OTHER_ROWS), seed=2)
    for position in range(0, 60, 3):
        alone, alone_lp = sample(target_logits[None], [target], [position])
        logits = torch.cat([others[:index], target_logits[None], others[index:]])
        params = [*OTHER_ROWS[:index], target, *OTHER_ROWS[index:]]
        positions = [position + 17 * i for i in range(len(params))]
        positions[index] = position
        batch, batch_lp = sample(logits, params, positions)
        assert batch[index].item() == alone.item(), f"position {position}"
        assert batch_lp[index].item() == pytest.approx(alone_lp.item(), abs=1e-6)


def test_seeded_draws_vary_with_position_and_seed():
    flat = torch.zeros(1, 320)
    by_position = draw_many(flat[0], sp(temperature=1.0, seed=5), 64)
    assert len(set(by_position.tolist())) > 32  # 64 draws from 320 equal tokens
    by_seed = [
        sample(flat, [sp(temperature=1.0, seed=s)], [10])[0].item() for s in range(0, 640, 10)
    ]
    assert len(set(by_seed)) > 32
    again = draw_many(flat[0], sp(temperature=1.0, seed=5), 64)
    assert (again == by_position).all()


def test_unseeded_sampling_runs_and_draws_from_the_support():
    logits = torch.full((200, VOCAB), -30.0)
    logits[:, [3, 11, 40]] = 0.0
    tokens, logprobs = sample(logits, [sp(temperature=1.0)] * 200, [0] * 200)
    assert set(tokens.tolist()) == {3, 11, 40}
    torch.testing.assert_close(logprobs, torch.full((200,), -math.log(3)), atol=1e-4, rtol=0)


# ---- top-k, top-p, temperature -------------------------------------------------------------


def test_top_k_1_is_greedy():
    logits = random_logits(32, seed=3)
    temps = [0.5, 1.0, 4.0] * 11
    params = [sp(temperature=temps[s], top_k=1, seed=s) for s in range(32)]
    tokens, _ = sample(logits, params, list(range(32)))
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("k", [2, 5, 10])
def test_top_k_draws_only_the_k_most_likely(k):
    row = random_logits(1, seed=k, scale=0.5)[0]
    top = set(row.topk(k).indices.tolist())
    drawn = set(draw_many(row, sp(temperature=1.0, top_k=k, seed=11), 1500).tolist())
    assert drawn <= top
    assert drawn == top  # and every one of them is reachable


BRIEF_PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    ("temperature", "top_p", "support"),
    [
        (1.0, 0.75, {0, 1}),
        (1.0, 0.85, {0, 1, 2}),
        (1.0, 0.4, {0}),  # the first token is always kept, even past top_p
        (1.0, 1.0, {0, 1, 2, 3}),
        (2.0, 0.75, {0, 1, 2}),  # temperature flattens before the nucleus is cut
    ],
)
def test_top_p_support(temperature, top_p, support):
    row = torch.tensor(BRIEF_PROBS).log()
    params = sp(temperature=temperature, top_p=top_p, seed=3)
    assert set(draw_many(row, params, 2000).tolist()) == support


@pytest.mark.parametrize(
    ("logits", "kw"),
    [
        ([2.0, 1.0, 0.5, 0.0, -1.0], dict(temperature=0.5)),
        ([2.0, 1.0, 0.5, 0.0, -1.0], dict(temperature=2.0)),
        ([2.0, 1.0, 0.5, 0.0, -1.0], dict(temperature=1.0)),
        ([0.3, 1.2, -0.4, 0.9, 0.0, 0.6], dict(temperature=1.5, top_k=3)),
        (np.log(BRIEF_PROBS).tolist(), dict(temperature=1.0, top_p=0.75)),
        (np.log(BRIEF_PROBS).tolist(), dict(temperature=2.0, top_p=0.75)),
        ([2.0, 1.0, 0.5, 0.0, -1.0], dict(temperature=1.0, min_p=0.2)),
        ([2.0, 1.0, 0.5, 0.0, -1.0], dict(temperature=2.0, min_p=0.3, top_p=0.9)),
    ],
    ids=["t0.5", "t2", "t1", "t1.5-topk3", "topp0.75", "t2-topp0.75", "minp0.2", "t2-minp-topp"],
)
def test_empirical_frequencies_match_the_processed_distribution(logits, kw):
    n = 4000
    tokens = draw_many(torch.tensor(logits), sp(seed=2024, **kw), n)
    freq = np.bincount(tokens, minlength=len(logits)) / n
    expected = reference_probs(logits, **kw)
    np.testing.assert_allclose(freq, expected, atol=0.03, rtol=0)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn


# ---- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("temperature", -1.0),
        ("temperature", 100.5),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("seed", -1),
        ("seed", 2**63),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("logit_bias", ((5, 100.5),)),
        ("logit_bias", ((5, math.nan),)),
        ("logit_bias", ((-1, 1.0),)),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**{field: value})
    assert exc.value.param == field
    assert field in str(exc.value)
    assert exc.value.http_status == 400


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_tokens=1),
        dict(temperature=0.0),
        dict(temperature=100.0),
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(top_k=0),
        dict(top_k=1),
        dict(seed=0),
        dict(seed=2**63 - 1),
    ],
)
def test_boundary_sampling_params_are_accepted(kw):
    params = SamplingParams(**kw)
    assert all(getattr(params, k) == v for k, v in kw.items())
    assert params.is_greedy == (params.temperature == 0.0)


def test_min_p_draws_only_tokens_within_its_share_of_the_top_one():
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # probs relative to the top: 1, .37, .22
    assert set(draw_many(row, sp(seed=5, min_p=0.3), 3000).tolist()) == {0, 1}
    assert set(draw_many(row, sp(seed=5, min_p=0.2), 3000).tolist()) == {0, 1, 2}
    assert set(draw_many(row, sp(seed=5, min_p=1.0), 500).tolist()) == {0}


def test_logit_bias_steers_greedy_and_sampled_rows_and_leaves_logprobs_the_models():
    logits = random_logits(4)
    top = logits.argmax(-1)
    ban = [sp(temperature=0.0, logit_bias=((int(t), -100.0),)) for t in top[:2]]
    force = [sp(temperature=t, seed=9, logit_bias=((7, 100.0),)) for t in (0.0, 1.0)]
    tokens, logprobs = sample(logits, ban + force, [0, 1, 2, 3])
    second = logits[:2].topk(2, dim=-1).indices[:, 1]
    assert tokens[:2].tolist() == second.tolist()  # the top token banned: the next one
    assert tokens[2:].tolist() == [7, 7]  # +100 forces token 7, greedy or sampled
    model = torch.log_softmax(logits, dim=-1)
    assert torch.equal(logprobs, model.gather(1, tokens[:, None]).squeeze(1))
    before = logits.clone()
    sample(logits, force, [0, 1])
    assert torch.equal(logits, before)  # the caller's logits are left as they were


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_logit_bias_and_min_p_on_the_gpu_as_on_the_cpu():
    logits = random_logits(6, vocab=32000)
    params = [
        sp(temperature=0.0, logit_bias=((int(logits[0].argmax()), -100.0), (3, 1.5))),
        sp(temperature=0.0, logit_bias=((31999, 100.0),)),
        sp(temperature=0.7, seed=1, min_p=1.0),  # only the top token survives: greedy
        sp(temperature=1.0, seed=2, logit_bias=((42, 100.0),), min_p=0.5),
        sp(temperature=0.0),
        sp(temperature=1.3, seed=3, min_p=1.0, top_p=0.5),
    ]
    positions = list(range(6))
    want, want_lp = sample(logits, params, positions)
    got, got_lp = sample(logits.cuda(), params, positions)
    assert got.cpu().tolist() == want.tolist()
    assert want.tolist()[1] == 31999 and want.tolist()[3] == 42
    assert want.tolist()[2] == int(logits[2].argmax()) and want.tolist()[5] == int(
        logits[5].argmax()
    )
    torch.testing.assert_close(got_lp.cpu(), want_lp, rtol=1e-5, atol=1e-5)


def test_a_bias_past_the_vocabulary_is_left_out():
    logits = random_logits(1)
    tokens, _ = sample(logits, [sp(temperature=0.0, logit_bias=((VOCAB + 5, 100.0),))], [0])
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_largest_seed_samples():
    tokens, _ = sample(random_logits(2), [sp(seed=2**63 - 1)] * 2, [0, 2**31])
    assert ((tokens >= 0) & (tokens < VOCAB)).all()


# ---- finish_reason ---------------------------------------------------------------------------

EOS_IDS = (257, 260)
MAX_LEN = 100


@pytest.mark.parametrize(
    ("params", "token", "num_generated", "num_tokens", "expected"),
    [
        (sp(stop_token_ids=(42, 7)), 7, 1, 10, "stop"),
        (sp(stop_token_ids=(42,), ignore_eos=True), 42, 3, 10, "stop"),
        (sp(), 257, 2, 10, "stop"),
        (sp(), 260, 2, 10, "stop"),
        (sp(ignore_eos=True), 257, 2, 10, None),
        (sp(ignore_eos=True), 257, 16, 30, "length"),
        (sp(max_tokens=16), 5, 16, 30, "length"),
        (sp(max_tokens=16), 5, 15, 29, None),
        (sp(max_tokens=16), 5, 3, MAX_LEN, "length"),
        (sp(max_tokens=16), 5, 3, MAX_LEN - 1, None),
        (sp(stop_token_ids=(5,)), 5, 16, MAX_LEN, "stop"),  # stop wins over length
        (sp(stop_token_ids=(42,)), 5, 1, 10, None),
    ],
    ids=[
        "stop-id",
        "stop-id-ignore-eos",
        "eos",
        "second-eos",
        "eos-ignored",
        "eos-ignored-at-max",
        "max-tokens",
        "below-max-tokens",
        "context-limit",
        "below-context-limit",
        "stop-beats-length",
        "other-token",
    ],
)
def test_finish_reason(params, token, num_generated, num_tokens, expected):
    assert finish_reason(params, token, num_generated, num_tokens, EOS_IDS, MAX_LEN) == expected


# ---- end to end on a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="module")
def runtime(tiny_dir):
    return LocalRuntime.from_dir(tiny_dir)


PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(30, 70)), [300]]


@pytest.mark.parametrize("index", [0, 2])
def test_seeded_request_is_the_same_alone_and_in_a_batch(runtime, index):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=31, ignore_eos=True)
    prompt = [72, 101, 108, 108, 111]
    (alone,) = runtime.generate([prompt], [seeded])
    others = [
        greedy(5),
        SamplingParams(max_tokens=20, temperature=0.8, seed=9),
        SamplingParams(max_tokens=3, temperature=1.0),
    ]
    prompts = PROMPTS[:3]
    prompts.insert(index, prompt)
    params = [*others[:index], seeded, *others[index:]]
    batch = runtime.generate(prompts, params)
    assert batch[index].token_ids == alone.token_ids
    assert batch[index].finish_reason == alone.finish_reason == "length"
    np.testing.assert_allclose(batch[index].logprobs, alone.logprobs, atol=1e-4)
    # the draw really was random: it is not the greedy continuation
    (greedy_gen,) = runtime.generate([prompt], [greedy(12, ignore_eos=True)])
    assert alone.token_ids != greedy_gen.token_ids
    assert runtime.allocator.num_used == 0


def test_greedy_logprobs_are_the_models(runtime):
    """The logprob of each generated token matches a separate forward pass over the text."""
    prompt = PROMPTS[0]
    (g,) = runtime.generate([prompt], [greedy(6, ignore_eos=True)])
    assert len(g.token_ids) == len(g.logprobs) == 6
    assert all(lp <= 0 for lp in g.logprobs)
    for i, (tok, lp) in enumerate(zip(g.token_ids, g.logprobs, strict=True)):
        # the next-token distribution after prompt + tokens so far, greedily
        (step,) = runtime.generate([prompt + g.token_ids[:i]], [greedy(1, ignore_eos=True)])
        assert step.token_ids == [tok]
        assert step.logprobs[0] == pytest.approx(lp, abs=1e-4)


def test_stop_token_cuts_right_after_its_first_occurrence(runtime):
    prompt = PROMPTS[0]
    (full,) = runtime.generate([prompt], [greedy(20, ignore_eos=True)])
    toks = full.token_ids
    # a token that first appears after the start, preferably one that recurs later
    candidates = [t for t in dict.fromkeys(toks) if toks.index(t) > 0 and t not in EOS_IDS]
    assert candidates, f"greedy output has no usable stop token: {toks}"
    stop = max(candidates, key=lambda t: toks.count(t))
    cut = toks.index(stop) + 1
    (g,) = runtime.generate([prompt], [greedy(20, ignore_eos=True, stop_token_ids=(stop,))])
    assert g.token_ids == toks[:cut]
    assert g.finish_reason == "stop"
    assert g.logprobs == pytest.approx(full.logprobs[:cut], abs=1e-5)
    assert runtime.allocator.num_used == 0


def test_eos_stops_unless_ignored(runtime):
    assert set(runtime.eos_token_ids) == {EOS, EOT}
    runs = runtime.generate(PROMPTS, [greedy(24, ignore_eos=True)] * len(PROMPTS))
    with_eos = [(p, g) for p, g in zip(PROMPTS, runs, strict=True) if EOS in g.token_ids]
    assert with_eos, "no prompt makes the tiny model emit EOS; pick other prompts"
    prompt, ignored = with_eos[0]
    assert len(ignored.token_ids) == 24 and ignored.finish_reason == "length"
    (g,) = runtime.generate([prompt], [greedy(24)])
    cut = ignored.token_ids.index(EOS) + 1
    assert g.token_ids == ignored.token_ids[:cut]
    assert g.finish_reason == "stop"


def test_batch_finishes_each_request_on_its_own(runtime):
    params = [greedy(1), greedy(7, ignore_eos=True), SamplingParams(max_tokens=4, seed=0)]
    gens = runtime.generate(PROMPTS[:3], params)
    assert [len(g.token_ids) for g in gens] == [1, 7, len(gens[2].token_ids)]
    assert 1 <= len(gens[2].token_ids) <= 4
    for prompt, p, g in zip(PROMPTS[:3], params, gens, strict=True):
        assert g.prompt_token_ids == prompt
        assert len(g.logprobs) == len(g.token_ids)
        assert g.finish_reason in ("length", "stop")
        assert g.block_table == []
        if p.is_greedy:  # batching does not change a greedy request's tokens
            (alone,) = runtime.generate([prompt], [p])
            assert alone.token_ids == g.token_ids
    assert runtime.allocator.num_used == 0
    assert runtime.allocator.num_free == runtime.allocator.num_blocks


def test_context_limit_finishes_with_length(tmp_path):
    model_dir = init_tiny(tmp_path, arch="llama", overrides=dict(max_position_embeddings=24))
    rt = LocalRuntime.from_dir(model_dir, num_blocks=8, block_tokens=4)
    (g,) = rt.generate([list(range(40, 60))], [greedy(50, ignore_eos=True)])
    assert len(g.token_ids) == 4  # 20 prompt tokens + 4 reach max_position_embeddings
    assert g.finish_reason == "length"
    with pytest.raises(InvalidRequestError) as exc:
        rt.generate([list(range(24))], [greedy(1)])
    assert exc.value.param == "prompt"
    with pytest.raises(InvalidRequestError):
        rt.generate([[]], [greedy(1)])
    assert rt.allocator.num_used == 0


def test_blocks_are_returned_when_the_pool_runs_out(tiny_dir):
    rt = LocalRuntime.from_dir(tiny_dir, num_blocks=4, block_tokens=4)
    assert isinstance(rt.allocator, BlockAllocator) and rt.allocator.num_blocks == 4
    with pytest.raises(OutOfBlocksError):  # 10 + 10 tokens need 6 blocks of 4
        rt.generate([list(range(10, 20)), list(range(20, 30))], [greedy(10, ignore_eos=True)] * 2)
    assert rt.allocator.num_used == 0
    (g,) = rt.generate([list(range(10, 20))], [greedy(6, ignore_eos=True)])  # 16 tokens fit
    assert len(g.token_ids) == 6
    assert rt.allocator.num_used == 0
