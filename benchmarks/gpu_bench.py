"""One GPU run that checks and times the decode path, side by side, and prints a table.

    python3 benchmarks/gpu_bench.py --out "$OUT"            # on a GPU machine (device tool)
    python3 benchmarks/gpu_bench.py --quick --out "$OUT"    # a smaller grid
    python3 benchmarks/gpu_bench.py --skip kernel greedy prefetch --model-shape opt-13b
    python3 benchmarks/gpu_bench.py --skip kernel greedy prefetch --no-grid  # its studies

1. environment: GPU, torch, triton;
2. measured ceilings in this run, as the worker measures them at start (worker/ceilings.py:
   HBM read bandwidth of a 1 GiB bf16 sum, bf16 matmul rate of an 8192 x 8192 x 4096 GEMM),
   the two sides of the roofline;
3. correctness: the Triton decode kernel against its torch twin at Llama-3-8B (GQA) and
   OPT-13B (MHA) layer shapes, bf16, fresh random inputs; greedy tokens of the GPU path equal
   the CPU path's on a tiny fp32 model;
4. decode step, Llama-3-8B shape (or --model-shape opt-13b), random bf16 weights, batch x
   KV length grid: eager and CUDA-graph step times against the roofline max(bytes / HBM
   bandwidth, FLOPs / matmul rate); cells whose KV does not fit are skipped;
5. prefetch: 8 GiB of KV into the decode GPU over one link and over two, in the block
   allocator's order and scattered (prefetch_bench).
Results go to stdout and to OUT/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from device_env import import_alignedserve

import_alignedserve()

import torch  # noqa: E402

from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402
from alignedserve.worker.attention import AttentionMetadata  # noqa: E402
from alignedserve.worker.ceilings import measure as measure_ceilings  # noqa: E402
from alignedserve.worker.cuda_graph import DecodeGraph, GraphInputs  # noqa: E402
from alignedserve.worker.kv_cache import KVCache  # noqa: E402
from alignedserve.worker.loader import fuse_projections  # noqa: E402
from alignedserve.worker.models import FAMILIES  # noqa: E402
from alignedserve.worker.tiny import FULL_SIZE, SHAPE_FAMILIES, TINY_CONFIGS  # noqa: E402


def cuda_time(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() over iters, each synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stream_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per fn() when the host queues them back to back, as the worker launches its
    steps (overlap_steps): CUDA events around iters calls, one synchronise at the end. A
    step the host cannot queue in time shows as the device waiting, so it counts."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def ceilings() -> dict[str, float]:
    """The GPU's ceilings as the worker measures them at start (worker/ceilings.py)."""
    got = measure_ceilings("cuda")
    return {
        "hbm_read_bytes_per_s": got.hbm_read_bytes_per_s,
        "matmul_flops_per_s": got.matmul_flops_per_s,
    }


def check_kernel() -> list[dict]:
    from alignedserve.worker.kernels.decode_attention import (
        decode_attention,
        decode_attention_ref,
    )

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, hq, hk in (("llama3-8b", 32, 8), ("opt-13b", 40, 40)):
        for batch, max_ctx in ((1, 4096), (64, 2048), (256, 1024)):
            block_tokens, d = 16, 128
            ctx = torch.randint(1, max_ctx + 1, (batch,), generator=gen, device="cuda")
            per = math.ceil(max_ctx / block_tokens)
            num_blocks = batch * per + 7
            k_blocks = torch.randn(
                num_blocks, block_tokens, hk, d, generator=gen, device="cuda"
            ).to(torch.bfloat16)
            v_blocks = torch.randn_like(k_blocks)
            tables = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * per]
            tables = tables.view(batch, per)
            q = torch.randn(batch, hq, d, generator=gen, device="cuda").to(torch.bfloat16)
            ref = decode_attention_ref(q, k_blocks, v_blocks, tables, ctx, d**-0.5)
            for chunk_tiles in (None, 1, 8):  # the kernel's own plan; fixed chunks of 1, 8 tiles
                out = decode_attention(
                    q, k_blocks, v_blocks, tables, ctx, d**-0.5, chunk_tiles=chunk_tiles
                )
                err = (out.float() - ref.float()).abs().max().item()
                rows.append(
                    dict(
                        shape=name,
                        batch=batch,
                        max_ctx=max_ctx,
                        chunk_tiles=chunk_tiles,
                        max_abs_err=err,
                    )
                )
                print(
                    f"  kernel {name} B={batch} ctx<={max_ctx} chunk_tiles={chunk_tiles}: "
                    f"err {err:.2e}"
                )
    return rows


def check_greedy() -> dict:
    from alignedserve.common.sampling_params import SamplingParams
    from alignedserve.worker.generate import LocalRuntime
    from alignedserve.worker.tiny import init_tiny

    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, arch="llama")
        prompts = [[5, 6, 7], list(range(40, 73)), [300, 1, 2, 3, 4, 5, 6, 7]]
        params = [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)] * 3
        cpu = LocalRuntime.from_dir(tmp, device="cpu").generate(prompts, params)
        gpu = LocalRuntime.from_dir(tmp, device="cuda").generate(prompts, params)
        graphs = LocalRuntime.from_dir(tmp, device="cuda", cuda_graphs=True)
        graphed = graphs.generate(prompts, params)
    same = [c.token_ids == g.token_ids for c, g in zip(cpu, gpu, strict=True)]
    same_graphs = [c.token_ids == g.token_ids for c, g in zip(cpu, graphed, strict=True)]
    print(f"  greedy tokens GPU == CPU (tiny fp32 llama, 3 prompts x 32): {same}")
    print(
        f"  ... with CUDA-graph decode (graph batch sizes {sorted(graphs.runner._graphs)}): "
        f"{same_graphs}"
    )
    return {"greedy_equal": same, "greedy_equal_graphs": same_graphs}


def random_model(shape: str, device: str = "cuda", tiny: bool = False):
    """A model of that shape (Llama-3-8B: GQA; OPT-13B: MHA; `tiny`: its family's tiny
    config) with random bf16 weights on `device`, and its config."""
    family = SHAPE_FAMILIES[shape]
    full = {} if tiny else FULL_SIZE[shape]
    config = ModelConfig.from_dict(dict(TINY_CONFIGS[family], **full, torch_dtype="bfloat16"))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = FAMILIES[family](config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    for table in embedding_tables(model):  # made uninitialised: every weight is the checkpoint's
        table.weight.normal_(0, 0.02)
    return model.eval(), config


def build_model(shape: str = "llama3-8b"):
    """A model of that shape with random bf16 weights on the GPU (`random_model`), its
    projections fused as load_model does there, and a KV cache of what memory is left
    (12 GiB kept free)."""
    model, config = random_model(shape)
    fuse_projections(model)  # as load_model does on a GPU
    layout = KVLayout.for_model(config, block_tokens=16, dtype="bfloat16")
    free, _ = torch.cuda.mem_get_info()
    kv = KVCache(layout, int((free - 12 * 2**30) // layout.block_bytes), device="cuda")
    return model, config, kv


def embedding_tables(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]


def decode_grid(
    ceil: dict[str, float], quick: bool, shape: str = "llama3-8b", grid: bool = True
) -> dict:
    """The grid (unless not `grid`), and prefill; for the Llama shape also mixed batches
    and a prefetch beside a step (studies of the shape the issue's targets name)."""
    model, config, kv = build_model(shape)
    num_blocks = kv.num_blocks
    params = sum(p.numel() for p in model.parameters())
    # a step reads B rows of each embedding table, and every other weight whole
    read_params = params - sum(t.weight.numel() for t in embedding_tables(model))
    cache_gib = num_blocks * kv.layout.block_bytes / 2**30
    print(f"  model {params / 1e9:.2f} B params, KV cache {cache_gib:.0f} GiB")
    batches = (64, 256) if quick else (64, 128, 256, 512)
    lengths = (512, 2048) if quick else (512, 1024, 2048, 4096, 8192)
    rows = []
    for batch in batches if grid else ():
        for length in lengths:
            per = kv.layout.blocks_for(length)
            if batch * per + 1 > num_blocks:
                print(f"  B={batch} L={length}: KV does not fit, skipped")
                continue
            rows.append(decode_cell(model, config, kv, ceil, read_params, batch, length, per))
    if rows:
        for key, label in (
            ("graph_fraction", "one step alone"),
            ("stream_fraction", "in a stream"),
        ):
            met = sum(row[key] >= 0.75 for row in rows)
            print(f"  cells at >= 75 % of the roofline, {label}: {met} of {len(rows)}")
    result = {"shape": shape, "grid": rows}
    if shape == "llama3-8b":
        result["mixed"] = [mixed_cell(model, config, kv, batch) for batch in (8, 32, 128)]
        result["with_prefetch"] = decode_with_prefetch(model, config, kv)
    result["prefill"] = prefill_speed(model, config, kv, ceil, read_params)
    return result


def served_lengths(batch: int, seed: int = 0) -> list[int]:
    """KV lengths of a served aligned batch on the 90 %-short mix: prompts of 32-1023
    tokens (90 %) or 1024-8191 plus up to 511 generated; at least one long one."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    for i in range(batch):
        is_long = i == 0 or torch.rand((), generator=gen) < 0.1
        lo, hi = (1024, 8192) if is_long else (32, 1024)
        prompt = int(torch.randint(lo, hi, (), generator=gen))
        lengths.append(prompt + int(torch.randint(0, 512, (), generator=gen)))
    return lengths


def length_cells(
    uniform: list[tuple[int, int]], mixed: list[int], long_last: list[int] = ()
) -> list[tuple[str, list[int]]]:
    """The scripts' cells, (name, each request's KV length): B x L uniform, a served mix of
    B (`served_lengths`), and that mix with its long requests last (a batch's order is its
    requests' arrival)."""
    cells = [(f"B={b} L={n}", [n] * b) for b, n in uniform]
    cells += [(f"B={b} served mix", served_lengths(b)) for b in mixed]
    return cells + [(f"B={b} mix, long last", served_lengths(b)[::-1]) for b in long_last]


def tables_for(lengths: list[int], width: int, kv) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables [B, width] giving each request its own consecutive blocks (the rest point
    at the scratch block), and the context lengths [B], on the GPU."""
    tables = torch.full((len(lengths), width), kv.num_blocks - 1, dtype=torch.long, device="cuda")
    start = 0
    for b, n in enumerate(lengths):
        per = kv.layout.blocks_for(n)
        tables[b, :per] = torch.arange(start, start + per, device="cuda")
        start += per
    return tables, torch.tensor(lengths, dtype=torch.long, device="cuda")


def mixed_cell(model, config, kv, batch: int) -> dict:
    """A served batch's lengths (one long request among short ones) against the same number
    of KV tokens spread evenly: the decode step through its graph and one layer's attention
    kernel, rows in arrival order and longest first. What a length spread costs the kernel
    shows as mixed > even; the two orders should time the same, as the kernel's plan puts
    the longest chunks first itself (twenty-fourth session)."""
    from alignedserve.worker.kernels.decode_attention import decode_attention

    mixed = served_lengths(batch)
    even = [sum(mixed) // batch] * batch
    # (the worker's graphs take tables as wide as the longest context; nothing reads the
    # entries past a request's blocks, so the width costs a step nothing)
    width = kv.layout.blocks_for(max(mixed))
    graph = DecodeGraph(model, kv, GraphInputs(batch, width, kv.num_blocks - 1, "cuda"))
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
    k_blocks, v_blocks = kv.layer(0)
    q = torch.randn(batch, config.num_heads, config.head_dim, dtype=torch.bfloat16, device="cuda")
    row = dict(batch=batch, lengths=mixed, width=width)
    cases = (("even", even), ("mixed", mixed), ("mixed longest first", sorted(mixed)[::-1]))
    for name, lengths in cases:
        tables, ctx = tables_for(lengths, width, kv)
        step = cuda_time(lambda t=tables, c=ctx: graph.replay(ids, t, c).argmax(-1))

        def attend(t=tables, c=ctx):
            return decode_attention(q, k_blocks, v_blocks, t, c, config.head_dim**-0.5)

        layer = cuda_time(attend, iters=50)
        row[name] = dict(graph_ms=step * 1e3, attention_layer_us=layer * 1e6)
    print(
        f"  B={batch:4d} mixed lengths (max {max(mixed)}, mean {sum(mixed) // batch}, width"
        f" {width}): "
        + "; ".join(
            f"{name}: graph {row[name]['graph_ms']:.2f} ms, attention "
            f"{row[name]['attention_layer_us']:.0f} us/layer"
            for name, _ in cases
        )
    )
    return row


def prefill_speed(model, config, kv, ceil, read_params) -> list[dict]:
    """Prefill through the model (fused SDPA per request, chunks continuing cached KV):
    prompt tokens per second and the fraction of the matmul ceiling reached."""
    rows = []
    for batch, q_len, cached in ((1, 2048, 0), (4, 2048, 0), (1, 2048, 6144)):
        per = kv.layout.blocks_for(cached + q_len)
        tables = torch.arange(batch * per, device="cuda").view(batch, per).tolist()
        ids = torch.randint(0, config.vocab_size, (batch * q_len,), device="cuda")

        def step(batch=batch, q_len=q_len, cached=cached, tables=tables, ids=ids):
            meta = AttentionMetadata.build(
                [q_len] * batch, [cached] * batch, tables, kv.layout.block_tokens, "cuda"
            )
            with torch.inference_mode():
                hidden = model(ids, meta.positions, meta, kv)
                return model.logits(hidden[meta.q_lens.cumsum(0) - 1])

        seconds = cuda_time(step, iters=5, warmup=2)
        tokens = batch * q_len
        attention = 4 * config.num_heads * config.head_dim * config.num_layers
        flops = tokens * 2 * read_params + batch * attention * q_len * (cached + q_len / 2)
        row = dict(batch=batch, q_len=q_len, cached=cached, ms=seconds * 1e3)
        row["tokens_per_s"] = tokens / seconds
        row["matmul_fraction"] = flops / seconds / ceil["matmul_flops_per_s"]
        rows.append(row)
        print(
            f"  prefill B={batch} chunk {q_len} after {cached} cached: {row['ms']:.1f} ms, "
            f"{row['tokens_per_s']:.0f} tok/s, {100 * row['matmul_fraction']:.0f}% of matmul peak"
        )
    return rows


def decode_with_prefetch(model, config, kv) -> dict:
    """A CUDA-graph decode step (B=64, L=2048) alone, and while 8 GiB of KV streams into the
    same GPU beside it (both links when there are two GPUs)."""
    from alignedserve.worker.prefetch import Prefetcher, pin, unpin

    batch, length, per = 64, 2048, 128
    tables = torch.arange(batch * per, device="cuda").view(batch, per)
    ctx = torch.full((batch,), length, dtype=torch.long, device="cuda")
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
    graph = DecodeGraph(model, kv, GraphInputs(batch, per, kv.num_blocks - 1, "cuda"))
    alone = cuda_time(lambda: graph.replay(ids, tables, ctx).argmax(-1))
    n = 4096  # 8 GiB: long enough to cover several steps, small enough for its temporaries
    host = torch.empty((n, *kv.layout.block_shape), dtype=torch.bfloat16)
    host.view(-1)[:: 1 << 20].fill_(1.0)
    pin(host)
    staging = "cuda:1" if torch.cuda.device_count() > 1 else None
    pre = Prefetcher(host, kv.blocks, staging_device=staging)
    dst = list(range(kv.num_blocks - 1 - n, kv.num_blocks - 1))  # not the cell's blocks
    torch.cuda.synchronize()
    events = pre.start(list(range(n)), dst)
    decode_stream = torch.cuda.current_stream()
    overlapped = []  # steps the prefetch was running for from start to end
    while not Prefetcher.done(events):
        start = time.perf_counter()
        graph.replay(ids, tables, ctx).argmax(-1)
        decode_stream.synchronize()  # this stream only: a device-wide sync waits for the copies
        if not Prefetcher.done(events):
            overlapped.append(time.perf_counter() - start)
    steps = len(overlapped)
    during = statistics.median(overlapped) if overlapped else float("nan")
    torch.cuda.synchronize()
    unpin(host)
    row = dict(alone_ms=alone * 1e3, with_prefetch_ms=during * 1e3, ratio=during / alone)
    row["steps_fully_overlapped"] = steps
    print(
        f"  decode B=64 L=2048 alone {row['alone_ms']:.2f} ms, with a prefetch beside it "
        f"{row['with_prefetch_ms']:.2f} ms (median of the {steps} steps the prefetch ran "
        f"through from start to end: {row['ratio']:.2f}x)"
    )
    return row


def decode_cell(model, config, kv, ceil, read_params, batch, length, per) -> dict:
    tables = torch.arange(batch * per, device="cuda").view(batch, per)
    ctx = torch.full((batch,), length, dtype=torch.long, device="cuda")
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")

    def eager():
        meta = AttentionMetadata.build(
            [1] * batch, [length - 1] * batch, tables.tolist(), 16, "cuda"
        )
        with torch.inference_mode():
            return model.logits(model(ids, meta.positions, meta, kv)).argmax(-1)

    graph = DecodeGraph(model, kv, GraphInputs(batch, per, kv.num_blocks - 1, "cuda"))
    step_eager = cuda_time(eager, iters=5, warmup=2)

    def step():
        return graph.replay(ids, tables, ctx).argmax(-1)

    step_graph = cuda_time(step)  # one step alone: the host's launch and wake-up count too
    step_stream = stream_time(step)  # steps queued back to back, as the worker runs them
    attention_flops = 4 * config.num_heads * config.head_dim * length * config.num_layers
    flops = batch * (2 * read_params + attention_flops)
    nbytes = read_params * 2 + batch * length * config.kv_bytes_per_token
    memory_s = nbytes / ceil["hbm_read_bytes_per_s"]
    compute_s = flops / ceil["matmul_flops_per_s"]
    roof = max(memory_s, compute_s)
    row = dict(
        batch=batch,
        kv_len=length,
        eager_ms=step_eager * 1e3,
        graph_ms=step_graph * 1e3,
        roofline_ms=roof * 1e3,
        bound="memory" if memory_s >= compute_s else "compute",
        graph_fraction=roof / step_graph,
        tokens_per_s=batch / step_graph,
        stream_ms=step_stream * 1e3,
        stream_fraction=roof / step_stream,
    )
    print(
        f"  B={batch:4d} L={length:5d}: eager {row['eager_ms']:7.2f} ms"
        f"  graph {row['graph_ms']:7.2f} ms  roofline {row['roofline_ms']:6.2f} ms"
        f" ({row['bound']})  {100 * row['graph_fraction']:5.1f}% of roofline"
        f"  {row['tokens_per_s']:8.0f} tok/s | in a stream {row['stream_ms']:7.2f} ms"
        f" {100 * row['stream_fraction']:5.1f}%"
    )
    return row


def prefetch_bench(ceil: dict[str, float], shares: list[float], repeats: int) -> dict:
    """KV of a batch into the decode GPU: one PCIe link vs both (the prefetch GPU's link +
    NVLink), for two block orders: the one the block allocator makes (runs of consecutive
    ids: prefetch_host.py's script of prefills, growth and a previous batch leaving, at 8
    GiB) and a random permutation (every block its own transfer, the worst case). Over two
    links: the decode GPU's share of the blocks balanced by the loads' measured rates (the
    worker's default: SplitBalance, after loads that let it settle) and held at the first
    share, and, for the allocator's order, held at each of `shares`. Each figure is the median
    of its loads; the whole section runs `repeats` times."""
    from prefetch_host import block_lists

    from alignedserve.common.block_allocator import BlockAllocator
    from alignedserve.worker.prefetch import Prefetcher, pin, unpin

    gpus = torch.cuda.device_count()
    block_shape = (32, 2, 16, 8, 128)  # one Llama-3-8B block: 2 MiB in bf16
    n = 4096  # 8 GiB of KV
    host = torch.empty((n, *block_shape), dtype=torch.bfloat16)
    host.view(-1)[:: 1 << 20].fill_(1.0)  # touch the pages
    pin(host)
    cache = torch.empty((n, *block_shape), dtype=torch.bfloat16, device="cuda:0")
    block_bytes = host[0].numel() * host.element_size()
    rng = random.Random(0)
    prompts = [rng.randint(150, 230) for _ in range(20)]  # ~3,800 blocks, 8 grown each
    loads = block_lists(BlockAllocator, n, n, prompts, seed=1)
    orders = {
        "allocator's runs": (
            [b for src, _ in loads for b in src],
            [b for _, dst in loads for b in dst],
        ),
        "scattered": (torch.randperm(n).tolist(), list(range(n))),
    }
    # (name, Prefetcher keywords, loads before timing, each waited for: a balanced split
    # learns from the loads done when the next starts)
    variants = [("one link", {}, 1)]
    if gpus > 1:
        two = {"staging_device": "cuda:1"}
        variants += [("two links", two, 8), ("two links, held", {**two, "balance": False}, 1)]
    out: dict[str, list[float]] = {}
    settled: dict[str, list[float]] = {}
    for _ in range(repeats):
        for order, (src, dst) in orders.items():
            nbytes = len(src) * block_bytes
            todo = list(variants)
            if gpus > 1 and order == "allocator's runs":
                todo += [
                    (f"two links, held at {x}", {**two, "balance": False, "direct_share": x}, 1)
                    for x in shares
                ]
            for name, kwargs, warmup in todo:
                pre = Prefetcher(host, cache, **kwargs)

                def run(pre=pre, src=src, dst=dst):
                    Prefetcher.wait_on(pre.start(src, dst))

                for _ in range(warmup):
                    run()
                    torch.cuda.synchronize()
                seconds = cuda_time(run, iters=5, warmup=0)
                out.setdefault(f"{order}, {name}", []).append(nbytes / seconds)
                share = f", share {pre.direct_share:.3f}" if pre.staging_device else ""
                if pre.is_balancing:
                    settled.setdefault(order, []).append(pre.direct_share)
                print(
                    f"  prefetch {nbytes / 2**30:.1f} GiB, {order}, {name}: "
                    f"{nbytes / seconds / 1e9:.1f} GB/s{share}"
                )
            if gpus > 1:
                ratio = out[f"{order}, two links"][-1] / out[f"{order}, one link"][-1]
                print(f"  {order}: two links / one link: {ratio:.2f}x")
    unpin(host)
    median = {k: statistics.median(v) for k, v in out.items()}
    for key, rates in out.items():
        print(f"  median of {len(rates)}: {key}: {median[key] / 1e9:.1f} GB/s")
    return {"bytes_per_s": median, "runs": out, "settled_share": settled, "gpus": gpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-grid", action="store_true", help="the decode section's studies without its grid"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="sections: kernel greedy decode prefetch"
    )
    parser.add_argument("--model-shape", choices=SHAPE_FAMILIES, default="llama3-8b")
    parser.add_argument(
        "--direct-shares",
        type=float,
        nargs="*",
        default=[],
        help="prefetch section: also hold the decode GPU's share at each of these",
    )
    parser.add_argument("--prefetch-repeats", type=int, default=1, help="prefetch section runs")
    args = parser.parse_args()
    import triton

    env = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print("environment:", env)
    result: dict = {"environment": env}
    result["ceilings"] = ceil = ceilings()
    print(
        f"ceilings: HBM read {ceil['hbm_read_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"bf16 matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"
    )
    if "kernel" not in args.skip:
        print("decode kernel vs torch reference (bf16):")
        result["kernel"] = check_kernel()
    if "greedy" not in args.skip:
        print("greedy tokens:")
        result["greedy"] = check_greedy()
    if "prefetch" not in args.skip:
        print("prefetch (GPU-Prefetch-For-GPU):")
        result["prefetch"] = prefetch_bench(ceil, args.direct_shares, args.prefetch_repeats)
    if "decode" not in args.skip:
        print(f"decode step, {args.model_shape} shape, random bf16 weights:")
        result["decode"] = decode_grid(ceil, args.quick, args.model_shape, not args.no_grid)
    out = Path(args.out) / "gpu_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
