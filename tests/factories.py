"""Shared test factories: tiny Hugging Face checkpoints, prompt batches, and the scripts of
benchmarks/ as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

VOCAB = 320


def hf_config(arch: str):
    """A tiny transformers config for one architecture (fp32, no EOS so generate runs fully)."""
    import transformers as tf

    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    if arch == "llama":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        return tf.LlamaConfig(**llama_like, rope_parameters=rope, attention_bias=True)
    if arch == "mistral":  # a window shorter than prompt + output exercises the sliding mask
        return tf.MistralConfig(**llama_like, sliding_window=24)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=32)
    opt = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    if arch == "opt":
        return tf.OPTConfig(**opt)
    if arch == "opt-350m":  # post-LN and embedding projections, as opt-350m has
        return tf.OPTConfig(**opt, do_layer_norm_before=False, word_embed_proj_dim=32)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "opt-350m")


def save_hf_model(arch: str, path: Path, seed: int = 0):
    """Random-weight transformers model saved with save_pretrained; returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(arch)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


def record_skinny_layers(monkeypatch) -> list[int]:
    """The layer index of every Llama layer that takes the fused small step
    (`LlamaDecoderLayer.skinny_forward`), in call order, while the test runs."""
    from alignedserve.worker.models import llama

    taken: list[int] = []
    original = llama.LlamaDecoderLayer.skinny_forward

    def skinny_forward(layer, *args):
        taken.append(layer.self_attn.layer_idx)
        return original(layer, *args)

    monkeypatch.setattr(llama.LlamaDecoderLayer, "skinny_forward", skinny_forward)
    return taken


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int, **kw):
    """Greedy SamplingParams (the runtime-vs-reference comparisons all decode greedily)."""
    from alignedserve.common.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/<name>.py, loaded afresh as a module; its sibling scripts importable while
    it loads, as when it runs."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def drive(
    sched, num_steps: int, turn_s: float, decode_s: float, arrivals=None, copy_steps: int = 0
):
    """The batcher engine's cycle around a Scheduler, on a simulated clock, one step answered
    before the next is planned.
    A turn takes the decode device turn_s, any other decode step decode_s; the prefill
    device runs its batches one after another, turn_s each (the same size as a turn).
    A load's copies end within its step, or with copy_steps > 0 after that many steps (as
    ~1 GB requests over one link do): the answer of its last lists it no longer.
    `arrivals(step, now)` may add requests. Returns the plans and (seconds in turns that
    decoded, seconds decoding otherwise)."""
    now, plans, in_turns, decoding = 0.0, [], 0.0, 0.0
    drive.decoding_before_last_turn = 0.0
    queued: list = []  # the prefill device's batches: (done at, chunks), in order
    copying: dict[str, int] = {}  # loads still copying: steps their copies still take
    for step in range(num_steps):
        if arrivals:
            arrivals(step, now)
        plan = sched.schedule(now)
        plans.append(plan)
        if plan.prefill:
            start = max([now, *(at for at, _ in queued[-1:])])
            queued.append((start + turn_s, plan.prefill))
        tokens = dict.fromkeys(plan.decode, 7)
        tokens.update((rid, 7) for rid, _ in plan.mixed_prefill)
        sched.update(plan, tokens, now)
        seconds = turn_s if sched.is_turn(plan) else decode_s if plan.decode else 0.001
        if not plan.decode and not plan.mixed_prefill and queued:
            seconds = max(seconds, queued[0][0] - now)  # the worker waits for the batch
        now += seconds
        while queued and queued[0][0] <= now:
            _, batch = queued.pop(0)
            sched.prefill_done([rid for rid, _ in batch], {rid: 7 for rid, _ in batch}, now)
        if plan.prefetch:
            sched.policy.on_prefetch_done()
        copying.update(dict.fromkeys(plan.load, max(copy_steps, 1)))
        copying = {r: n - 1 for r, n in copying.items()}
        copied = [r for r, n in copying.items() if n <= 0]
        if copied:
            sched.policy.on_copied(copied)
        copying = {r: n for r, n in copying.items() if n > 0}
        sched.observe_step(plan, seconds)
        if sched.is_turn(plan):
            drive.decoding_before_last_turn = decoding
        if sched.is_turn(plan) and plan.decode:
            in_turns += seconds
        elif plan.decode:
            decoding += seconds
        sched.check_invariants()
    return plans, in_turns, decoding


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus exposition text's samples: each value by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
