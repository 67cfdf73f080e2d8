"""Our runtime against Hugging Face transformers, the independent reference, per architecture:
prefill logits (fp32, max abs diff <= 1e-4) and 32 greedy tokens for a batch of prompts of
different lengths (ours batched over the block-format KV cache; theirs one prompt at a time)."""

from __future__ import annotations

import pytest
import torch

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.runner import SeqChunk

from factories import ARCHS, random_prompts, record_skinny_layers, save_hf_model

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


def test_a_mixed_step_in_any_order_matches_transformers(models):
    """Decode rows between and after prompt chunks: the runner packs the decode rows first
    (attention.decode_first) and gives the logits back in the chunks' order, each chunk's
    last token's and every token's, as transformers computes them for the whole prompts."""
    hf, ours = models
    prompts = random_prompts((9, 14, 6, 11), seed=5)
    tables = [tuple(ours.allocator.allocate(ours.layout.blocks_for(len(p)))) for p in prompts]
    cached = [len(prompts[1]) - 1, len(prompts[3]) - 1]  # 1 and 3 decode their last token
    ours.runner.forward(
        [SeqChunk(str(i), tuple(prompts[i][:n]), 0, tables[i], None)
         for i, n in zip((1, 3), cached, strict=True)]
    )  # fmt: skip
    step = [
        SeqChunk("0", tuple(prompts[0]), 0, tables[0], None),
        SeqChunk("1", (prompts[1][-1],), cached[0], tables[1], None),
        SeqChunk("2", tuple(prompts[2]), 0, tables[2], None),
        SeqChunk("3", (prompts[3][-1],), cached[1], tables[3], None),
    ]
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]  # [len, vocab] each
    wanted_all = torch.cat([refs[0], refs[1][-1:], refs[2], refs[3][-1:]])
    try:
        got_all = ours.runner.forward(step, all_logits=True)  # the same pass twice: the
        got_last = ours.runner.forward(step)  # blocks are rewritten with the same K/V
    finally:
        ours.allocator.free([b for t in tables for b in t])
    assert (got_all - wanted_all).abs().max().item() <= 1e-4
    wanted_last = torch.stack([ref[-1] for ref in refs])
    assert (got_last - wanted_last).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused_ops", [True, False])
def test_bf16_decode_on_a_gpu_is_as_close_as_transformers_bf16(fused_ops, tmp_path, monkeypatch):
    """bf16 on a GPU, as served: fused GEMMs with the RMSNorm gains folded into them, Triton
    kernels, and at a decode batch of 8 the skinny GEMM's fused small step (or, with
    fused_ops off, the separate kernels). Against transformers' fp32 logits, our decode
    step's error stays within 1.5x transformers' own bf16 error on the same inputs."""
    import transformers as tf

    from alignedserve.worker.kernels import skinny_linear

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    hf = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # gains other than transformers' initial 1, so folding them counts
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    hf.save_pretrained(tmp_path)
    hf32 = hf.to("cuda")
    hf16 = tf.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda").eval()
    ours = LocalRuntime.from_dir(
        tmp_path, device="cuda", dtype="bfloat16", block_tokens=16, num_blocks=256,
        load_tokenizer=False,
    )  # fmt: skip
    monkeypatch.setattr(skinny_linear, "FUSED_OPS", fused_ops)
    taken = record_skinny_layers(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 4096, (n,), generator=gen).tolist() for n in range(20, 100, 10)]
    nexts = torch.randint(2, 4096, (len(prompts),), generator=gen).tolist()
    tables = [tuple(ours.allocator.allocate(ours.layout.blocks_for(len(p) + 1))) for p in prompts]
    names = [str(i) for i in range(len(prompts))]
    chunks = [
        SeqChunk(n, tuple(p), 0, t, None) for n, p, t in zip(names, prompts, tables, strict=True)
    ]
    ours.runner.forward(chunks)  # prefill: 440 rows, cuBLAS and the separate kernels
    assert not taken
    step = [
        SeqChunk(n, (tok,), len(p), t, None)
        for n, p, tok, t in zip(names, prompts, nexts, tables, strict=True)
    ]
    got = ours.runner.forward(step).float()  # [8, vocab]: a decode step of 8
    assert len(taken) == (config.num_hidden_layers if fused_ops else 0)
    seqs = [[*p, t] for p, t in zip(prompts, nexts, strict=True)]
    ref32, ref16 = last_logits(hf32, seqs), last_logits(hf16, seqs)
    ours_err = (got - ref32).abs().max().item()
    hf_err = (ref16 - ref32).abs().max().item()
    assert hf_err > 0  # bf16 rounding shows, so the bound below is not vacuous
    assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)


def last_logits(hf, seqs: list[list[int]]) -> torch.Tensor:  # [len(seqs), vocab] fp32
    with torch.no_grad():
        return torch.stack(
            [hf(torch.tensor([seq], device="cuda")).logits[0, -1].float() for seq in seqs]
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_chunked_prefill_on_a_gpu_matches_transformers(arch, tmp_path):
    """fp32 on a GPU: a batch of prompts prefilled in two chunks each, so the second chunk's
    keys are gathered back out of the blocks (kernels/kv_rows.py, and its append for OPT;
    Llama appends in its RoPE kernel), against transformers' logits for the whole prompts."""
    hf = save_hf_model(arch, tmp_path).to("cuda")
    ours = LocalRuntime.from_dir(
        tmp_path, device="cuda", num_blocks=256, block_tokens=BLOCK_TOKENS, load_tokenizer=False
    )
    prompts = random_prompts((19, 26, 33), seed=4)
    tables = [tuple(ours.allocator.allocate(ours.layout.blocks_for(len(p)))) for p in prompts]
    first = [len(p) // 2 + 1 for p in prompts]  # cut mid-block: the chunk starts mid-block
    ours.runner.forward(
        [SeqChunk(str(i), tuple(p[:n]), 0, t, None)
         for i, (p, n, t) in enumerate(zip(prompts, first, tables, strict=True))]
    )  # fmt: skip
    got = ours.runner.forward(
        [SeqChunk(str(i), tuple(p[n:]), n, t, None)
         for i, (p, n, t) in enumerate(zip(prompts, first, tables, strict=True))],
        all_logits=True,
    )  # fmt: skip  # [sum of second chunks, vocab]
    start = 0
    with torch.no_grad():
        for p, n in zip(prompts, first, strict=True):
            ref = hf(torch.tensor([p], device="cuda")).logits[0, n:]  # [len - n, vocab]
            assert (got[start : start + len(ref)] - ref).abs().max().item() <= 1e-4
            start += len(ref)
