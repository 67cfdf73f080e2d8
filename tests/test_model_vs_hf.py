"""Our runtime against Hugging Face transformers, the independent reference, per architecture:
prefill logits (fp32, max abs diff <= 1e-4) and 32 greedy tokens for a batch of prompts of
different lengths (ours batched over the block-format KV cache; theirs one prompt at a time)."""

from __future__ import annotations

import pytest
import torch

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.runner import SeqChunk

from factories import ARCHS, random_prompts, save_hf_model

PROMPT_LENGTHS = (3, 11, 17, 30)
BLOCK_TOKENS = 4  # small blocks: every request spans several, non-contiguous ones


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    ours = LocalRuntime.from_dir(
        path, num_blocks=256, block_tokens=BLOCK_TOKENS, load_tokenizer=False
    )
    return hf, ours


def test_prefill_logits_match(models):
    hf, ours = models
    prompts = random_prompts(PROMPT_LENGTHS)
    tables = [ours.allocator.allocate(ours.layout.blocks_for(len(p))) for p in prompts]
    chunks = [
        SeqChunk(str(i), tuple(p), 0, tuple(t), None)
        for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
    ]
    logits = ours.runner.forward(chunks, all_logits=True)  # [sum(len), vocab]
    for t in tables:
        ours.allocator.free(t)
    start = 0
    with torch.no_grad():
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0]  # [len, vocab]
            got = logits[start : start + len(p)]
            start += len(p)
            assert (got - ref).abs().max().item() <= 1e-4


def test_greedy_tokens_match(models):
    hf, ours = models
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    gens = ours.generate(prompts, [params] * len(prompts))
    with torch.no_grad():
        for p, g in zip(prompts, gens, strict=True):
            ref = hf.generate(
                torch.tensor([p]), max_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(p) :]
            assert g.token_ids == ref.tolist()
            assert g.finish_reason == "length"
    assert ours.allocator.num_used == 0  # every block came back


def test_prefill_then_decode_equals_longer_prefill(models):
    _, ours = models
    (prompt,) = random_prompts((21,), seed=2)
    n = len(prompt) - 1
    a = ours.allocator.allocate(ours.layout.blocks_for(n + 1))
    b = ours.allocator.allocate(ours.layout.blocks_for(n + 1))
    try:
        full = ours.runner.forward([SeqChunk("a", tuple(prompt), 0, tuple(a), None)])
        ours.runner.forward([SeqChunk("b", tuple(prompt[:n]), 0, tuple(b), None)])
        step = ours.runner.forward([SeqChunk("b", (prompt[n],), n, tuple(b), None)])
    finally:
        ours.allocator.free(a + b)
    assert (full - step).abs().max().item() <= 1e-5
