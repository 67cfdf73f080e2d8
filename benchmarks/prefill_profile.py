"""Where a prefill pass's time goes, kernel class by kernel class, against its GEMMs alone.

    python3 benchmarks/prefill_profile.py --out "$OUT"   # one GPU; both shapes, ~1.5 min

Prefill is where our engines trail vLLM at equal KV (phase_compare.py, session 39: OPT-13B
prompts at 0.93x its prompt tokens/s, decode at 0.99x). For each model shape (random bf16
weights, projections fused as served):
1. one prefill pass of 4 fresh prompts x 2048 tokens (the batcher's 8,192-token budget), one
   chunk of 2048 after 6144 cached, and a step as fcfs serves a burst (192 decode rows at
   512 tokens, 4 prompts of 2,000 filling the budget), timed (median; also with the K/V
   rows moved by advanced indexing, as before kernels/kv_rows.py, and with torch's FA2 for
   the attention, as before kernels/prefill_attention.py) and under torch.profiler:
   device time per kernel class (GEMM, attention, norm, activation, RoPE + KV append, K/V
   rows, other), and the top kernels;
2. the same GEMMs alone: each projection of a layer at M = 8192 through F.linear, times the
   layers; the pass's GEMM time over this says what the pass costs the GEMMs, its wall over
   this what everything else costs;
3. for a ReLU MLP (OPT), fc1 then ReLU against cuBLASLt's fused epilogue
   (torch._addmm_activation), at M = 8192: what fusing the activation would save;
4. each pass's attention alone, torch's FlashAttention 2 (served until the fortieth session)
   against the Triton kernel that replaced it (kernels/prefill_attention.py) in each tiling of
   its SWEEP, on the same inputs, and how far apart they are.
Results go to stdout and OUT/prefill_profile.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import torch.nn.functional as F
from gpu_bench import build_model, ceilings, cuda_time
from step_profile import kernel_class

from alignedserve.worker.attention import AttentionMetadata
from alignedserve.worker.kernels import kv_rows, prefill_attention

# each pass: its requests' (new tokens, cached tokens)
PASSES = {
    "4 x 2048 fresh": [(2048, 0)] * 4,  # the batcher's 8,192-token prefill budget
    "2048 after 6144": [(2048, 6144)],  # a long prompt's last chunk
    # a step as fcfs serves a burst: 192 running requests decode, prompts fill the rest (their
    # contexts at 512: at 1,024 they would need more blocks than OPT-13B's cache holds)
    # (decode rows first, as the runner packs a mixed step: attention.decode_first)
    "4 x 2000 fresh + 192 decode rows at 512": [(1, 511)] * 192 + [(2000, 0)] * 4,
}


def prefill_pass(model, config, kv, requests: list[tuple[int, int]]):
    """One forward pass over the requests' new tokens, each request on its own blocks."""
    tables, start = [], 0
    for q_len, cached in requests:
        per = kv.layout.blocks_for(cached + q_len)
        tables.append(list(range(start, start + per)))
        start += per
    if start > kv.num_blocks:
        raise ValueError(f"the pass needs {start} blocks; the cache holds {kv.num_blocks}")
    q_lens, cached = [q for q, _ in requests], [c for _, c in requests]
    ids = torch.randint(0, config.vocab_size, (sum(q_lens),), device="cuda")

    def run():
        meta = AttentionMetadata.build(q_lens, cached, tables, kv.layout.block_tokens, "cuda")
        with torch.inference_mode():
            hidden = model(ids, meta.positions, meta, kv)
            return model.logits(hidden[meta.q_lens.cumsum(0) - 1])

    return run


@contextlib.contextmanager
def indexing():
    """kernels/kv_rows.py's torch twins in its place: the advanced indexing served before the
    thirty-ninth session, timed beside it in the same run."""
    kernels = kv_rows.write_rows, kv_rows.gather_rows
    kv_rows.write_rows, kv_rows.gather_rows = kv_rows.write_rows_ref, kv_rows.gather_rows_ref
    try:
        yield
    finally:
        kv_rows.write_rows, kv_rows.gather_rows = kernels


def fa2(q, k, v, cu_q, cu_k, max_q, scale, tiling=None, out=None, max_k=None):
    """torch's FlashAttention 2 as the prefill pass called it before the fortieth session (q
    made contiguous), in prefill_attention.prefill_attention's signature; `max_k`, the
    longest request's keys, is read from cu_k unless given (a host sync the served call did
    not make)."""
    if max_k is None:
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    got = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )[0]
    return got if out is None else out.copy_(got)


@contextlib.contextmanager
def flash_attention():
    """The pass's attention by torch's FA2 instead of the Triton kernel, timed beside it."""
    kernel = prefill_attention.prefill_attention
    prefill_attention.prefill_attention = fa2
    try:
        yield
    finally:
        prefill_attention.prefill_attention = kernel


def profile(run, repeats: int = 3) -> tuple[dict[str, float], list]:
    """Device ms per pass by kernel class, and the top kernels (ms per pass, calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or 0
        if device_us <= 0 or event.key.startswith(("aten::", "cuda")):
            continue  # operators, not kernels: their kernels are counted themselves
        label = prefill_class(event.key)
        by_class[label] = by_class.get(label, 0.0) + device_us / 1e3 / repeats
        kernels[event.key[:90]] = (device_us / 1e3 / repeats, event.count // repeats)
    return by_class, sorted(kernels.items(), key=lambda kv_: -kv_[1][0])[:12]


def prefill_class(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention"
    if "kv_rows" in lowered:
        return "kv rows"
    if "layer_norm" in lowered or "layernorm" in lowered:
        return "norm"
    if "relu" in lowered or "gelu" in lowered or "clamp_min" in lowered:
        return "activation"
    return kernel_class(name)


def linears_of_layer(model) -> list[torch.nn.Linear]:
    layer = next(m for m in model.modules() if m.__class__.__name__.endswith("DecoderLayer"))
    return [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def gemms_alone(model, config, tokens: int, ceil: dict) -> dict:
    """Each projection of one layer at M = tokens through F.linear, times the layers."""
    rows, total_ms, flops = [], 0.0, 0
    for lin in linears_of_layer(model):
        x = torch.randn(tokens, lin.in_features, device="cuda", dtype=lin.weight.dtype)
        ms = cuda_time(lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias), iters=20) * 1e3
        f = 2 * tokens * lin.in_features * lin.out_features
        rows.append(dict(shape=[lin.out_features, lin.in_features], ms=ms, tflops=f / ms / 1e9))
        total_ms += ms
        flops += f
    layers = config.num_layers
    return dict(
        per_layer=rows,
        total_ms=total_ms * layers,
        tflops=flops / total_ms / 1e9,
        fraction_of_peak=flops / (total_ms / 1e3) / ceil["matmul_flops_per_s"],
    )


def fused_relu(model, tokens: int) -> dict | None:
    """fc1 + ReLU: two kernels against cuBLASLt's ReLU epilogue, at M = tokens."""
    layer = next((m for m in model.modules() if hasattr(m, "fc1")), None)
    if layer is None or getattr(layer.act, "__name__", "") != "relu":
        return None
    fc1 = layer.fc1
    x = torch.randn(tokens, fc1.in_features, device="cuda", dtype=fc1.weight.dtype)
    apart = cuda_time(lambda: F.relu(F.linear(x, fc1.weight, fc1.bias)), iters=20)
    fused = cuda_time(
        lambda: torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=False), iters=20
    )
    same = torch.equal(
        F.relu(F.linear(x, fc1.weight, fc1.bias)),
        torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=False),
    )
    return dict(apart_ms=apart * 1e3, fused_ms=fused * 1e3, bitwise_equal=same)


def attention_side_by_side(config, requests: list[tuple[int, int]]) -> dict:
    """One layer's prefill attention over the requests' prompt chunks (their decode rows left
    out): torch's FlashAttention 2 (served before) against kernels/prefill_attention.py
    (served now) in each tiling, on the same bf16 inputs, times the layers; and how far apart
    they are."""
    chunks = [(q, c) for q, c in requests if q > 1]
    q_lens, ctx = [q for q, _ in chunks], [q + c for q, c in chunks]
    hq, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(ctx), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(ctx), hk, d, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.int32)
    cu_q = torch.cat([zero, torch.tensor(q_lens).cumsum(0).int()]).cuda()
    cu_k = torch.cat([zero, torch.tensor(ctx).cumsum(0).int()]).cuda()
    scale = d**-0.5

    def flash():
        return fa2(q, k, v, cu_q, cu_k, max(q_lens), scale, max_k=max(ctx))

    layers = config.num_layers
    want = flash().float()
    row = dict(flash_ms=cuda_time(flash, iters=20) * 1e3 * layers, triton=[])
    print(f"    attention, {layers} layers: torch FA2 {row['flash_ms']:.1f} ms", flush=True)
    for tiling in prefill_attention.SWEEP:

        def triton_kernel(tiling=tiling):
            return prefill_attention.prefill_attention(
                q, k, v, cu_q, cu_k, max(q_lens), scale, tiling
            )

        ms = cuda_time(triton_kernel, iters=20) * 1e3 * layers
        diff = (triton_kernel().float() - want).abs().max().item()
        row["triton"].append(dict(tiling=dataclasses.asdict(tiling), ms=ms, max_abs_diff=diff))
        print(
            f"      Triton {tiling}: {ms:.1f} ms ({row['flash_ms'] / ms:.2f}x FA2's speed); "
            f"max |diff| {diff:.3g}",
            flush=True,
        )
    return row


def study(shape: str, ceil: dict) -> dict:
    model, config, kv = build_model(shape)
    result = {"shape": shape, "passes": []}
    print(f"{shape}:", flush=True)
    for name, requests in PASSES.items():
        run = prefill_pass(model, config, kv, requests)
        wall_ms = cuda_time(run, iters=5, warmup=2) * 1e3
        with indexing():
            indexing_ms = cuda_time(run, iters=5, warmup=2) * 1e3
        with flash_attention():
            fa2_ms = cuda_time(run, iters=5, warmup=2) * 1e3
        by_class, top = profile(run)
        tokens = sum(q for q, _ in requests)
        row = dict(name=name, tokens=tokens, wall_ms=wall_ms, indexing_wall_ms=indexing_ms)
        row["fa2_wall_ms"] = fa2_ms
        row.update(tokens_per_s=tokens / wall_ms * 1e3, by_class_ms=by_class, top=top)
        result["passes"].append(row)
        parts = "  ".join(f"{k} {v:.1f}" for k, v in sorted(by_class.items(), key=lambda x: -x[1]))
        print(
            f"  {name}: {wall_ms:.1f} ms ({row['tokens_per_s']:.0f} tok/s; with indexing for "
            f"the K/V rows {indexing_ms:.1f} ms, with FA2 {fa2_ms:.1f} ms), "
            f"kernels {sum(by_class.values()):.1f} ms "
            f"| {parts}",
            flush=True,
        )
        for kernel, (ms, count) in top:
            print(f"      {ms:7.2f} ms  x{count:4d}  {kernel}")
        row["attention"] = attention_side_by_side(config, requests)
    first = result["passes"][0]
    alone = gemms_alone(model, config, first["tokens"], ceil)
    result["gemms_alone"] = alone
    in_pass = first["by_class_ms"].get("gemm", 0.0)
    print(
        f"  GEMMs alone at M = {first['tokens']}: {alone['total_ms']:.1f} ms "
        f"({alone['tflops']:.0f} TFLOP/s, "
        f"{100 * alone['fraction_of_peak']:.0f}% of the matmul ceiling); in the pass "
        f"{in_pass:.1f} ms; the pass's wall {first['wall_ms']:.1f} ms"
    )
    for row in alone["per_layer"]:
        print(f"      {row['shape']}: {row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s")
    relu = fused_relu(model, first["tokens"])
    if relu is not None:
        result["fc1_relu"] = relu
        print(
            f"  fc1 + ReLU apart {relu['apart_ms']:.3f} ms, fused epilogue "
            f"{relu['fused_ms']:.3f} ms (same bits: {relu['bitwise_equal']})"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "opt-13b"])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    ceil = ceilings()
    print(
        f"{torch.cuda.get_device_name()}: matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} "
        f"TFLOP/s, HBM read {ceil['hbm_read_bytes_per_s'] / 1e9:.0f} GB/s",
        flush=True,
    )
    results = {"device": torch.cuda.get_device_name(), "ceilings": ceil}
    results["shapes"] = []
    for shape in args.shapes:
        results["shapes"].append(study(shape, ceil))
        gc.collect()  # the model and its KV cache, before the next shape's take the memory
        torch.cuda.empty_cache()
    (Path(args.out) / "prefill_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
