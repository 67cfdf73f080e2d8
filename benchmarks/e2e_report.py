"""The report of benchmarks/gpu_e2e.py: each variant's bench results read back from its work
folder, compared with the baseline's cell by cell against issue 6's targets, and written as
Markdown, JSON and a TPOT plot. Pure file reading and arithmetic: the runner (gpu_e2e.py)
starts the servers and the benches, and calls `make_report` after each step.
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_busy import device_busy

# ---------------------------------------------------------------- what is compared

# the docstring says what each runs
VARIANTS = (
    "aligned",
    "aligned-solo",
    "aligned-turns",
    "aligned-sync",
    "aligned-serial",
    "aligned-wait1",
    "aligned-cut",
    "aligned-fitgroups",
    "aligned-pool80",
    "aligned-dp2",
    "fcfs",
    "fcfs-dp2",
    "fcfs-dp2-byrequests",
    "vllm",
    "vllm-samekv",
    "vllm-dp2",
)


def is_dp2(variant: str) -> bool:
    """Two engines, one per GPU, behind one router."""
    return "dp2" in variant.split("-")


@dataclass(frozen=True)
class Shape:
    arch: str  # key of tiny.TINY_CONFIGS; the full size is tiny.FULL_SIZE[name]
    attention: str
    checkpoint_gib: float  # bf16 weights, to decide whether /dev/shm has room
    min_throughput_ratio: float  # issue 6: aligned ÷ baseline output tok/s
    min_tpot_ratio: float  # issue 6: baseline ÷ aligned p99 TPOT


SHAPES = {
    "llama3-8b": Shape("llama", "GQA", 15.0, 1.2, 2.0),
    "opt-13b": Shape("opt", "MHA", 24.5, 1.5, 3.0),
}


# ---------------------------------------------------------------- the report


VARIANT_TEXT = {
    "aligned": "router + batcher + worker decoding on --device, --prefetch-device prefilling, "
    "loading KV, and decoding residents of its own once no prompt has waited for a while",
    "aligned-solo": "aligned whose prefetch GPU only prefills (--prefill-decode-blocks 0)",
    "aligned-turns": "aligned, its decode GPU taking prefill turns (--decode-prefill-share 0.5)",
    "aligned-sync": "aligned, each step planned once the last is answered",
    "aligned-serial": "aligned, each step queued on the GPU once the last is answered",
    "aligned-wait1": "aligned, no pooled request waiting over 1 s for a batch (--starvation-s 1)",
    "aligned-cut": "aligned, its prefill GPU's batches cutting their last prompt at the budget "
    "(--no-prefill-whole-prompts)",
    "aligned-fitgroups": "aligned, pooled requests that fit a resident group loading first, "
    "then the oldest (--load-order fit-groups)",
    "aligned-pool80": "aligned with an 80 GiB CPU pool (about the decode GPU's KV; "
    "--pool-gib 80), whatever --pool-gib the run sets",
    "fcfs": "one fcfs engine on --device, the second GPU idle",
    "aligned-dp2": "two aligned engines, one per GPU, each alone on its GPU (prefill mixed "
    "into its steps), behind one router (least loaded first)",
    "fcfs-dp2": "two fcfs engines, one per GPU, behind one router (least loaded first, by "
    "context tokens)",
    "fcfs-dp2-byrequests": "fcfs-dp2 whose router counts load in live requests "
    "(--balance-by requests; for fcfs, which pools nothing, the count used before session 33)",
    "vllm": "vLLM's OpenAI server on --device with its defaults for this GPU (V1 engine, "
    "torch.compile, CUDA graphs, chunked prefill, prefix caching), bf16, 0.9 of the GPU's memory",
    "vllm-samekv": "vllm with our engines' device KV (--kv-cache-memory-bytes of --device-kv-gib)",
    "vllm-dp2": "vLLM's data parallelism over --device and --prefetch-device "
    "(--data-parallel-size 2), each engine with our device KV",
}

# other projects' servers: compared with, never judged by issue 6's targets
PEER_SERVERS = ("vllm", "vllm-samekv", "vllm-dp2")


MIN_PEER_RATIO = 10.0  # issue 6: at least 10x the transformers peer's output tok/s


# below this share of a variant's bench time making tokens, its workers waited on the front end
MAX_FRONT_END_LAG = 0.8


MIN_CHUNKS_PER_TOKEN = 0.9  # below it, the stream coalesced tokens: latency is suspect


def offline_part(k: int) -> str:
    """The directory of a variant's k-th offline run (1, 2, ...)."""
    return "offline" if k == 1 else f"offline-{k}"


def bench_parts(work: Path, variant: str) -> list[tuple[str, str]]:
    """(directory, load label suffix) of a variant's bench runs: the offline runs in order
    (the k-th labelled "#k" from the second on), then the online one."""
    repeats = sorted(
        int(p.name.split("-")[1])
        for p in (work / variant).glob("offline-*")
        if p.name.split("-")[1].isdigit()
    )
    return [
        ("offline", ""),
        *((offline_part(k), f" #{k}") for k in repeats),
        ("online", ""),
    ]


def load_runs(work: Path) -> dict[str, dict[str, dict]]:
    """runs[load][variant] = that bench run's JSON (summary and per-request rows); a
    repeated offline run's load is "offline #k"."""
    runs: dict[str, dict[str, dict]] = {}
    for variant in VARIANTS:
        for part, suffix in bench_parts(work, variant):
            path = work / variant / part / "bench.json"
            if path.is_file():
                for run in json.loads(path.read_text())["runs"]:
                    runs.setdefault(run["load"] + suffix, {})[variant] = run
    return runs


def offline_spread(runs: dict[str, dict[str, dict]], baseline: str) -> dict[str, Any] | None:
    """With more than one offline run of aligned and the baseline: each one's output tok/s
    over its runs, the ratio of their medians, and the range of the ratio (the runs of two
    variants are not paired: they ran on different servers, one after the other). A run cut
    short (requests unfinished at its time cap) is left out: its rate is the cap's."""
    offline = [by_variant for load, by_variant in runs.items() if load.startswith("offline")]
    tok_s = {
        variant: [
            r[variant]["summary"]["output_tokens_per_s"]
            for r in offline
            if variant in r and not num_unfinished(r[variant])
        ]
        for variant in ("aligned", baseline)
    }
    if min(len(v) for v in tok_s.values()) < 2:
        return None
    a, b = tok_s["aligned"], tok_s[baseline]
    return {
        "output_tokens_per_s": tok_s,
        "median_ratio": statistics.median(a) / statistics.median(b),
        "min_ratio": min(a) / max(b),
        "max_ratio": max(a) / min(b),
    }


def chunks_per_token(run: dict) -> float | None:
    """Streamed chunks per output token: 1 when every token arrived as its own chunk."""
    ok = [r for r in run["requests"] if r["error"] is None]
    tokens = sum(r["completion_tokens"] for r in ok)
    return sum(r["num_chunks"] for r in ok) / tokens if tokens else None


def _p99_tpot_s(run: dict) -> float | None:
    tpot = run["summary"]["tpot_s"]
    return tpot["p99"] if tpot else None


UNJUDGED = "not judged, requests unfinished or failed"  # a cell's `unjudged` when so


def num_unfinished(run: dict) -> int:
    return run["summary"]["num_failed"] + run["summary"]["num_not_sent"]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def cell(
    load: str,
    by_variant: dict[str, dict],
    variants: list[str],
    baseline: str,
    shape: Shape,
    capacity_per_s: float | None,
) -> dict[str, Any]:
    """One load: each variant's numbers, and aligned against the baseline by the issue's
    targets, with the reasons the numbers give. capacity_per_s: the lesser of aligned's and
    the baseline's offline request rates."""
    row: dict[str, Any] = {"load": load, "notes": []}
    for variant in variants:
        run = by_variant.get(variant)
        if run is None:
            row["notes"].append(f"{variant}: no run")
            continue
        s = run["summary"]
        row[variant] = {
            "requests_per_s": s["requests_per_s"],
            "output_tokens_per_s": s["output_tokens_per_s"],
            "p50_tpot_s": s["tpot_s"]["p50"] if s["tpot_s"] else None,
            "p99_tpot_s": _p99_tpot_s(run),
            "p99_ttft_s": s["ttft_s"]["p99"] if s["ttft_s"] else None,
            "chunks_per_token": chunks_per_token(run),
            "num_failed": num_unfinished(run),
        }
        if row[variant]["num_failed"]:
            row["notes"].append(
                f"{variant}: {row[variant]['num_failed']} requests unfinished (run timeout)"
            )
        cpt = row[variant]["chunks_per_token"]
        if cpt is not None and cpt < MIN_CHUNKS_PER_TOKEN:
            row["notes"].append(f"{variant}: {cpt:.2f} chunks per token, latency suspect")
    a, b = by_variant.get("aligned"), by_variant.get(baseline)
    if a is None or b is None:
        return row
    rate = a["shape"].get("rate_per_s")
    row["offered_rate_per_s"] = rate
    row["throughput_ratio"] = _ratio(
        a["summary"]["output_tokens_per_s"], b["summary"]["output_tokens_per_s"]
    )
    row["tpot_ratio"] = _ratio(_p99_tpot_s(b), _p99_tpot_s(a))
    if num_unfinished(a) or num_unfinished(b):  # e.g. a rate measured up to a time cap
        row["throughput_met"] = row["tpot_met"] = None
        row["unjudged"] = UNJUDGED
    else:
        row["throughput_met"] = (row["throughput_ratio"] or 0) >= shape.min_throughput_ratio
        row["tpot_met"] = (row["tpot_ratio"] or 0) >= shape.min_tpot_ratio
    if isinstance(rate, int | float) and capacity_per_s and rate < capacity_per_s:
        row["notes"].append(
            f"{rate:g} req/s is below both aligned's and {baseline}'s offline rates "
            f"(≥ {capacity_per_s:.2f} req/s): throughput follows the offered load"
        )
    return row


def offline_capacity(runs: dict[str, dict[str, dict]], baseline: str) -> float | None:
    offline = runs.get("offline", {})
    compared = ("aligned", baseline)
    if not set(compared) <= offline.keys() or any(num_unfinished(offline[p]) for p in compared):
        return None
    return min(offline[p]["summary"]["requests_per_s"] for p in compared)


def peer_cell(work: Path, runs: dict[str, dict[str, dict]], args) -> dict[str, Any] | None:
    path = work / "peer.json"
    if not path.is_file():
        return None
    peer = json.loads(path.read_text())
    ours_path = work / "aligned-peer" / "bench.json"
    if ours_path.is_file():
        ours = json.loads(ours_path.read_text())["runs"][0]
    else:  # the peer's requests are the offline run's own
        ours = runs.get("offline", {}).get("aligned")
    row = {"peer": peer, "notes": []}
    if ours is not None:
        s = ours["summary"]
        row["ours"] = {k: s[k] for k in ("num_ok", "duration_s", "output_tokens_per_s")}
        row["ratio"] = _ratio(s["output_tokens_per_s"], peer["output_tokens_per_s"])
        row["met"] = (row["ratio"] or 0) >= MIN_PEER_RATIO
    if peer["timed_out"]:
        row["notes"].append(
            f"peer stopped at its {args.peer_timeout_s:g} s timeout: "
            f"{peer['num_finished']}/{peer['num_requests']} requests finished"
        )
    if peer["num_full_length"] != peer["num_finished"]:
        row["notes"].append("peer: some requests stopped short of max_tokens")
    return row


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f}"


def _x(value: float | None, target: float, met: bool | None, unjudged: str = "") -> str:
    if unjudged:
        return f"{'–' if value is None else f'{value:.2f}×'} (≥ {target:g}×: {unjudged})"
    if value is None:
        return f"– (≥ {target:g}×: missed)"
    return f"**{value:.2f}×** (≥ {target:g}×: {'met' if met else 'missed'})"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    shape = SHAPES[report["model_shape"]]
    c = report["config"]
    baseline = c["baseline"]
    dp2 = [v for v in c["policies"] if is_dp2(v)]  # two engines: each half the pool
    lines = [
        f"## {report['model_shape']} ({shape.attention}), {c['workload']}, "
        f"{c['num_requests']} requests per run, aligned vs {baseline}",
        "",
        f"Ratios and targets compare aligned with the baseline, **{baseline}**. Variants: "
        + "; ".join(f"{v} = {VARIANT_TEXT[v]}" for v in c["policies"])
        + ".",
        "",
        f"Device: {report.get('device', '?')} (--device {c['device']}, --prefetch-device "
        f"{c['prefetch_device'] or '–'}); date {report['date']}; CPU pool {c['pool_gib']:g} GiB"
        + (f" ({', '.join(dp2)}: half per batcher)" if dp2 else "")
        + f", {c['device_blocks']} device KV blocks "
        f"({c['device_kv_gib']:g} GiB) per engine; {c.get('num_clients', 1)} bench client "
        f"processes; {c.get('num_routers', 1)} router process(es). Timings: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()),
        "",
        *(
            f"**{v} failed**: {why} (its logs are in the .tar.gz)\n"
            for v, why in report.get("failures", {}).items()
        ),
        "| load | variant | req/s | output tok/s | p50 TPOT ms | p99 TPOT ms | chunks per token |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["cells"]:
        for variant in c["policies"]:
            if variant in row:
                v = row[variant]
                lines.append(
                    f"| {row['load']} | {variant} | {_num(v['requests_per_s'], '.2f')} "
                    f"| {_num(v['output_tokens_per_s'], '.0f')} | {_ms(v['p50_tpot_s'])} "
                    f"| {_ms(v['p99_tpot_s'])} | {_num(v['chunks_per_token'], '.3f')} |"
                )
    if baseline in PEER_SERVERS:
        lines += ["", *peer_server_ratios(report["cells"], c["policies"], baseline)]
        return finish_markdown(report, lines)
    lines += [
        "",
        f"| load | aligned ÷ {baseline} output tok/s | {baseline} ÷ aligned p99 TPOT | notes |",
        "|---|---|---|---|",
    ]
    for row in report["cells"]:
        unjudged = row.get("unjudged", "")
        throughput = _x(
            row.get("throughput_ratio"),
            shape.min_throughput_ratio,
            row.get("throughput_met"),
            unjudged,
        )
        tpot = _x(row.get("tpot_ratio"), shape.min_tpot_ratio, row.get("tpot_met"), unjudged)
        lines.append(
            f"| {row['load']} | {throughput} | {tpot} | {'; '.join(row['notes']) or '–'} |"
        )
    spread = report.get("offline_spread")
    if spread is not None:
        lines += ["", offline_spread_line(spread, baseline, shape.min_throughput_ratio)]
    return finish_markdown(report, lines)


def peer_server_ratios(cells: list[dict], variants: list[str], baseline: str) -> list[str]:
    """Each of our variants against another project's server, load by load: issue 6's targets
    are against fcfs, so these ratios are reported, not judged."""
    lines = [
        f"| load | variant | ÷ {baseline} output tok/s | {baseline} ÷ variant p99 TPOT |",
        "|---|---|---|---|",
    ]
    for row in cells:
        base = row.get(baseline)
        for variant in variants:
            ours = row.get(variant)
            if variant == baseline or ours is None or base is None:
                continue
            tok = _ratio(ours["output_tokens_per_s"], base["output_tokens_per_s"])
            tpot = _ratio(base["p99_tpot_s"], ours["p99_tpot_s"])
            lines.append(
                f"| {row['load']} | {variant} | {_num(tok, '.2f')}× | {_num(tpot, '.2f')}× |"
            )
    return lines


def finish_markdown(report: dict[str, Any], lines: list[str]) -> str:
    """The sections after the ratios: the transformers peer, GPU busy, each bench's table."""
    peer = report.get("peer")
    if peer is not None:
        p = peer["peer"]
        lines += [
            "",
            f"Peer: transformers {p['transformers']} continuous batching "
            f"({p['attn_implementation']}, greedy, EOS ignored), the same checkpoint, "
            f"the {p['num_requests']} requests of an offline run: {p['num_finished']} finished, "
            f"{p['generated_tokens']}/{p['expected_tokens']} tokens in {p['wall_s']:.1f} s "
            f"(load {p['load_s']:.0f} s, warm-up {p['warmup_s']:.0f} s not counted): "
            f"**{p['output_tokens_per_s']:.0f} output tok/s**.",
        ]  # fmt: skip
        if "ours" in peer:
            o = peer["ours"]
            lines.append(
                f"AlignedServe (aligned), the same requests offline: {o['num_ok']} in "
                f"{o['duration_s']:.1f} s, **{o['output_tokens_per_s']:.0f} output tok/s**: "
                f"{_x(peer['ratio'], MIN_PEER_RATIO, peer['met'])}."
            )
        if peer["notes"]:
            lines.append("Notes: " + "; ".join(peer["notes"]) + ".")
    busy = report.get("gpu_busy") or {}
    if busy:
        lines += [
            "",
            "GPU busy while the worker made tokens (its 1 s stats lines, all of a variant's "
            "runs): "
            + "; ".join(
                f"{variant} {log}: decode device {100 * b['decode_busy']:.0f}%"
                + (f", prefill device {100 * b['prefill_busy']:.0f}%" if b["prefill_busy"] else "")
                + f" of {b['window_s']:.0f} s"
                for variant, v in busy.items()
                for log, b in v["logs"].items()
            )
            + ".",
        ]
        lagged = [variant for variant, v in busy.items() if v["front_end_bound"]]
        if lagged:
            lines.append(
                "**Front-end bound**: "
                + "; ".join(
                    f"{variant}'s workers made tokens for {busy[variant]['window_s']:.0f} s of "
                    f"its bench's {busy[variant]['bench_s']:.0f} s"
                    for variant in lagged
                )
                + ": the router or the bench clients, not the GPUs, set the pace of those "
                "runs, and their tokens/s compare front ends, not engines."
            )
    for policy, table in report["bench_tables"].items():
        lines += ["", f"### {policy}", "", table.strip()]
    return "\n".join(lines) + "\n"


def offline_spread_line(spread: dict[str, Any], baseline: str, target: float) -> str:
    each = "; ".join(
        f"{variant} " + ", ".join(f"{v:.0f}" for v in values) + " tok/s"
        for variant, values in spread["output_tokens_per_s"].items()
    )
    met = "met" if spread["median_ratio"] >= target else "missed"
    return (
        f"Offline, every run: {each}. Ratio of the medians (aligned ÷ {baseline}): "
        f"**{spread['median_ratio']:.2f}×** (≥ {target:g}×: {met}); any aligned run against "
        f"any {baseline} run: {spread['min_ratio']:.2f}–{spread['max_ratio']:.2f}×."
    )


FAILED = "failed.txt"  # in work/<variant>/: why the variant has no results


def failures(work: Path) -> dict[str, str]:
    """Each variant that failed, with the reason `main` wrote."""
    return {v: (work / v / FAILED).read_text() for v in VARIANTS if (work / v / FAILED).is_file()}


def make_report(
    args, work: Path, runs: dict[str, dict[str, dict]], timings: dict, blocks: int, device: str
) -> dict[str, Any]:
    shape = SHAPES[args.model_shape]
    capacity = offline_capacity(runs, args.baseline)
    tables = {}
    parts = [f"{v}/{part}" for v in VARIANTS for part, _ in bench_parts(work, v)]
    for name in (*parts, "aligned-peer"):
        if (work / name / "bench.md").is_file():
            tables[name] = (work / name / "bench.md").read_text()
    return {
        "model_shape": args.model_shape,
        "tiny": args.tiny,
        "failures": failures(work),
        "device": device,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "config": {
            "policies": args.policies,
            "baseline": args.baseline,
            "device": args.device,
            "prefetch_device": args.prefetch_device,
            "workload": args.workload,
            "num_requests": args.num_requests,
            "rates": args.rate,
            "rate_fractions": args.rate_fraction,
            "pool_gib": args.pool_gib,
            "device_kv_gib": args.device_kv_gib,
            "device_blocks": blocks,
            "peer_requests": args.peer_requests,
            "offline_repeats": args.offline_repeats,
            "num_clients": args.num_clients,
            "num_routers": args.num_routers,
        },
        "targets": {
            "throughput_ratio": shape.min_throughput_ratio,
            "p99_tpot_ratio": shape.min_tpot_ratio,
            "peer_ratio": MIN_PEER_RATIO,
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "cells": [
            cell(load, by_variant, args.policies, args.baseline, shape, capacity)
            for load, by_variant in runs.items()
        ],
        "offline_spread": offline_spread(runs, args.baseline),
        "peer": peer_cell(work, runs, args),
        "gpu_busy": gpu_busy(work, args.policies, runs),
        "bench_tables": tables,
    }


def gpu_busy(work: Path, variants: list[str], runs: dict[str, dict[str, dict]]) -> dict:
    """Per variant and worker log: each device's busy share while it made tokens (all of the
    variant's runs together); and "bench_s", how long the variant's bench runs took. When its
    workers made tokens for much less than that, the front end (router, bench clients), not
    the GPUs, set the pace: "front_end_bound"."""
    busy: dict[str, dict[str, Any]] = {}
    for variant in variants:
        logs = {}
        for path in sorted((work / variant / "logs").glob("*.log")):
            shares = device_busy(path.read_text(errors="replace").splitlines())
            if shares is not None:
                logs[path.stem] = shares
        if not logs:
            continue
        bench_s = sum(
            r[variant]["summary"].get("duration_s") or 0 for r in runs.values() if variant in r
        )
        window_s = max(b["window_s"] for b in logs.values())  # the longest-busy worker's
        busy[variant] = {
            "logs": logs,
            "window_s": window_s,
            "bench_s": bench_s,
            "front_end_bound": bench_s > 0 and window_s < MAX_FRONT_END_LAG * bench_s,
        }
    return busy


def plot_tpot(runs: dict[str, dict[str, dict]], path: Path, title: str) -> bool:
    """One panel per load: each policy's TPOT CDF over its requests."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not runs:
        return False
    figure, axes = plt.subplots(
        1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (load, by_policy) in zip(axes[0], runs.items(), strict=True):
        for policy, run in by_policy.items():
            tpots = [1e3 * r["tpot_s"] for r in run["requests"] if r["tpot_s"] is not None]
            if tpots:
                ax.ecdf(tpots, label=policy)
        ax.set(title=load, xlabel="TPOT (ms)", ylabel="fraction of requests")
        ax.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def write_outputs(args, work: Path, timings: dict, blocks: int, device: str) -> str:
    """Writes the report's files; returns its Markdown."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_e2e_{args.model_shape}{'_tiny' if args.tiny else ''}"
    runs = load_runs(work)
    report = make_report(args, work, runs, timings, blocks, device)
    markdown = render_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    plot_tpot(runs, out / f"{stem}_tpot.png", f"{args.model_shape}: TPOT per request")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(work, arcname=stem)
    (out / f"{stem}.tar.gz").write_bytes(buffer.getvalue())
    return markdown
