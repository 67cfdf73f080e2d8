"""Issue 6 in one call: aligned against an fcfs baseline through the HTTP API on a GPU pair,
and transformers' continuous batching on the same checkpoint and requests.

The variants (--policies; --baseline names the one aligned is compared with):
- aligned: `alignedserve serve --policy aligned`, one engine decoding on --device with
  --prefetch-device, the pair's second GPU, loading KV beside it, prefilling, and decoding
  residents of its own once no prompt has waited for a while;
- fcfs: the same server with `--policy fcfs` (vLLM-style continuous batching): one engine
  computing on --device, the second GPU idle;
- aligned-solo: aligned whose prefill GPU only prefills (--prefill-decode-blocks 0). aligned's
  prefill GPU also decodes residents of its own once no prompt has waited for a while (role
  switching, on by default since session 14; in session 14's first two calls that variant is
  `aligned-both` and `aligned` is this one; in session 13's results `aligned-solo` is this
  one and `aligned` is role switching);
- aligned-turns: aligned whose decode GPU also takes prefill turns while a backlog waits
  (--decode-prefill-share 0.5, scheduler/turns.py; aligned's default is 0, none);
- aligned-sync: aligned with a batcher that waits for each step's answer before it plans the
  next (--max-steps-in-flight 1; every other variant runs one step ahead of the answers);
- aligned-serial: aligned with a worker that answers each step before it queues the next on
  the GPU (--no-overlap-steps; every other variant's worker queues step N+1 behind step N);
- aligned-wait1: aligned whose pooled requests wait at most 1 s for a batch (--starvation-s 1;
  5 s by default): a bound on the pool's wait when the run's KV outgrows the decode GPU;
- fcfs-dp2 (the default baseline): fcfs data-parallel on the same two GPUs, as a deployment
  scales it: two workers, one per GPU (--device and --prefetch-device), each with its own
  fcfs batcher (half of --pool-gib each), behind one router that sends each request to the
  least loaded batcher. On CPU with no --prefetch-device, both workers run on --device.

    python3 benchmarks/gpu_e2e.py --model-shape llama3-8b --num-requests 100 \\
        --rate 4 --rate 6 --rate 8 --peer-requests 48 --out "$OUT"  # nvidia-h200-x2; carry .wheels
    .venv/bin/python benchmarks/gpu_e2e.py --tiny --device cpu --prefetch-device "" \\
        --workload fixed-32-24 --num-requests 8 --rate 4 --peer-requests 4 \\
        --out /tmp/e2e  # a CPU dry run (2 min on 2 cores)

For one model shape (random weights, bf16; llama3-8b is GQA, opt-13b is MHA):
1. the checkpoint is written (on /dev/shm when it has room), with a tokenizer padded to the
   model's vocabulary, so that every id the model samples streams as text of its own;
2. the peer, benchmarks/hf_peer.py, generates for the bench's offline requests (a bounded
   subset: --peer-requests of them) on --device, before any server takes the GPU;
3. for each variant, its server(s) and `alignedserve bench` on the router: offline
   (--offline-repeats times: one run's makespan hangs on its last prefilled requests), then
   each --rate (Poisson), the same requests for every variant, EOS ignored. The aligned server also
   runs the peer's requests offline, unless they are the offline run's own (--peer-requests =
   --num-requests);
4. the report, rewritten after each step so that a call cut short still returns what it did:
   OUT/gpu_e2e_<shape>.md and .json (every variant's cells, aligned ÷ baseline output tok/s and
   baseline ÷ aligned p99 TPOT against the issue's targets, with repeated offline runs the
   ratio of their medians, and the peer ratio), _tpot.png
   (TPOT CDFs), and .tar.gz (each bench's own JSON, Markdown and plots, and the peer's JSON).

--deadline-s (from the start) sizes each bench's per-run timeout, so that the call ends inside
the device tool's 10-minute limit; a cell cut short is reported with its unfinished requests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_busy import device_busy
from device_env import ROOT, child_pythonpath, import_alignedserve

import_alignedserve()
from alignedserve.common import flags  # noqa: E402
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.metrics import PREFIX  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402
from alignedserve.router.config import RouterConfig  # noqa: E402
from alignedserve.serve import (  # noqa: E402
    EngineSettings,
    ServeConfig,
    batcher_args,
    batcher_config,
    free_port,
    worker_args,
)

# the docstring says what each runs
VARIANTS = (
    "aligned",
    "aligned-solo",
    "aligned-turns",
    "aligned-sync",
    "aligned-serial",
    "aligned-wait1",
    "fcfs",
    "fcfs-dp2",
)
# the parts of a variant's name after its policy, and the serve flags each adds: -solo, the
# prefetch GPU only prefills; -turns, the decode GPU prefills too; -sync, the batcher waits for
# each answer; -serial, the worker answers each step before it queues the next; -wait1, no
# pooled request waits more than 1 s for a batch (5 s by default)
PART_SETTINGS = {
    "solo": {"prefill_decode_blocks": 0},
    "turns": {"decode_prefill_share": 0.5},
    "sync": {"max_steps_in_flight": 1},
    "serial": {"overlap_steps": False},
    "wait1": {"starvation_s": 1.0},
}
BASELINES = ("fcfs", "fcfs-dp2")
VARIANT_TEXT = {
    "aligned": "router + batcher + worker decoding on --device, --prefetch-device prefilling, "
    "loading KV, and decoding residents of its own once no prompt has waited for a while",
    "aligned-solo": "aligned whose prefetch GPU only prefills (--prefill-decode-blocks 0)",
    "aligned-turns": "aligned, its decode GPU taking prefill turns (--decode-prefill-share 0.5)",
    "aligned-sync": "aligned, each step planned once the last is answered",
    "aligned-serial": "aligned, each step queued on the GPU once the last is answered",
    "aligned-wait1": "aligned, no pooled request waiting over 1 s for a batch (--starvation-s 1)",
    "fcfs": "one fcfs engine on --device, the second GPU idle",
    "fcfs-dp2": "two fcfs engines, one per GPU, behind one router (least loaded first)",
}
MIN_PEER_RATIO = 10.0  # issue 6: at least 10x the transformers peer's output tok/s
TINY_VOCAB = 8192  # a dry run's vocabulary: as in the full ones, nearly every id is a word
SERVER_OVERHEAD_S = 60.0  # reserved for each server still to start and stop
# below this share of a variant's bench time making tokens, its workers waited on the front end
MAX_FRONT_END_LAG = 0.8
MIN_CHUNKS_PER_TOKEN = 0.9  # below it, the stream coalesced tokens: latency is suspect


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


# ---------------------------------------------------------------- the runs


class Clock:
    """Seconds left before the call's deadline."""

    def __init__(self, deadline_s: float):
        self.start = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def run_timeout(self, runs_left: int, servers_after: int, cap_s: float) -> float:
        """Each bench run still to come gets an equal share of what the servers leave."""
        share = (self.left() - servers_after * SERVER_OVERHEAD_S) / max(runs_left, 1)
        return max(10.0, min(cap_s, share))


def environment() -> dict[str, str]:
    """The child processes' environment: the project importable, the carried wheels in."""
    # stats lines every second: device_busy reads each GPU's share from the worker's
    env = dict(
        os.environ,
        PYTHONPATH=child_pythonpath(),
        PYTHONUNBUFFERED="1",
        ALIGNEDSERVE_STATS_INTERVAL_S="1",
    )
    wheels = ROOT / ".wheels"
    if wheels.is_dir():  # the router's and the bench's packages, carried along
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
             str(wheels), "fastapi", "uvicorn", "httptools", "uvloop", "httpx"],
            check=True,
        )  # fmt: skip
    return env


def model_root(shape: Shape, pool_gib: float, tiny: bool) -> str | None:
    """/dev/shm when the checkpoint fits beside the KV pool (which lives there too): writing
    and loading skip the disk. None: the default temporary directory."""
    need_bytes = (0 if tiny else shape.checkpoint_gib + pool_gib + 8) * 2**30
    try:
        if shutil.disk_usage("/dev/shm").free > need_bytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def write_model(
    path: Path, name: str, shape: Shape, env: dict[str, str], tiny: bool, device: str
) -> None:
    """The random checkpoint, drawn on the decode device when it is a GPU (seconds instead of
    the CPU's minutes; CUDA's generator gives other weights than the CPU's for the seed)."""
    overrides = f"{{'vocab_size': {TINY_VOCAB}}}" if tiny else f"FULL_SIZE[{name!r}]"
    dtype = "float32" if tiny else "bfloat16"
    draw_on = device if device.startswith("cuda") else "cpu"
    code = (
        "from alignedserve.worker.tiny import FULL_SIZE, init_tiny; "
        f"init_tiny({str(path)!r}, arch={shape.arch!r}, dtype={dtype!r}, overrides={overrides}, "
        f"device={draw_on!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def device_blocks(model: Path, kv_gib: float) -> int:
    """KV blocks in kv_gib GiB of the decode GPU, for this checkpoint's layout."""
    layout = KVLayout.for_model(ModelConfig.from_dir(model))
    return int(kv_gib * 2**30 // layout.block_bytes)


def http_get(url: str) -> str | None:
    """The body of a 200 answer; None for any other answer or none."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode() if r.status == 200 else None
    except OSError:
        return None


def wait_until(
    ready: Callable[[], bool], procs: list[subprocess.Popen], timeout_s: float, what: str
) -> None:
    """Polls `ready` until true; fails early when one of the processes serving it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                name = " ".join(a for a in proc.args[2:5] if not a.startswith("-"))
                raise RuntimeError(f"{name} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} never ready")


def wait_ready(url: str, procs: list[subprocess.Popen], timeout_s: float) -> None:
    wait_until(lambda: http_get(f"{url}/ready") is not None, procs, timeout_s, url)


def worker_attached(metrics_url: str) -> bool:
    """The batcher's worker_ready gauge reads 1: its worker has loaded and attached."""
    text = http_get(metrics_url) or ""
    return any(
        line.startswith(f"{PREFIX}worker_ready{{") and float(line.split()[-1]) == 1
        for line in text.splitlines()
    )


def stop(tiers: list[list[subprocess.Popen]], timeout_s: float = 60) -> None:
    """Front to back, one tier at a time (each drains into the one behind it): SIGTERM, then
    up to timeout_s to exit before a SIGKILL."""
    for procs in tiers:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bench_args(args, vocab: int, num_requests: int, rates: list[float], timeout_s: float):
    return [
        sys.executable, "-m", "alignedserve", "bench",
        "--base-url", f"http://127.0.0.1:{args.port}", "--vocab-size", str(vocab),
        "--workload", args.workload, "--num-requests", str(num_requests),
        *[x for r in rates for x in ("--rate", str(r))], "--timeout-s", f"{timeout_s:.0f}",
        "--num-clients", str(args.num_clients),
    ]  # fmt: skip


def start_serve(policy, args, model, env, blocks, tiers, logs: Path) -> None:
    """`alignedserve serve`: router, batcher and worker under one process (its log and its
    children's in logs/serve.log)."""
    more = {k: v for part in policy.split("-")[1:] for k, v in PART_SETTINGS[part].items()}
    config = ServeConfig(
        model=str(model),
        device=args.device,
        prefetch_device=args.prefetch_device,
        policy=policy.split("-")[0],
        port=args.port,
        pool_gib=args.pool_gib,
        num_device_blocks=blocks,
        num_routers=args.num_routers,
        **more,
    )
    cmd = [sys.executable, "-m", "alignedserve", "serve", *flags.to_args(config)]
    tiers.append([popen_logged(cmd, env, logs / "serve.log")])
    wait_ready(f"http://127.0.0.1:{args.port}", tiers[0], timeout_s=300)


def popen_logged(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The process started with its output (stdout and stderr) in the file `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_fcfs_dp2(args, model, env, blocks, tiers, logs: Path) -> None:
    """Two fcfs workers and batchers, one pair per device, behind one router. Each list joins
    `tiers` before its processes start, so that any started are stopped if a later one fails.
    Each process logs to a file of its own in `logs` (worker-0.log, ...)."""
    role = [sys.executable, "-m", "alignedserve", "serve"]
    workers: list[subprocess.Popen] = []
    batchers: list[subprocess.Popen] = []
    tiers += [workers, batchers]
    addresses, metrics_urls = [], []
    for i, device in enumerate((args.device, args.prefetch_device or args.device)):
        worker_port, batcher_port, metrics_port = free_port(), free_port(), free_port()
        # Half the pool each: the CPU pools' host memory totals the single-server variants'.
        settings = EngineSettings(
            device=device, policy="fcfs", num_device_blocks=blocks, pool_gib=args.pool_gib / 2
        )
        worker_cmd = [*role, "worker", *worker_args(settings, str(model), worker_port)]
        workers.append(popen_logged(worker_cmd, env, logs / f"worker-{i}.log"))
        batcher = batcher_config(
            settings, f"127.0.0.1:{worker_port}", port=batcher_port, metrics_port=metrics_port
        )
        batcher_cmd = [*role, "batcher", *batcher_args(batcher)]
        batchers.append(popen_logged(batcher_cmd, env, logs / f"batcher-{i}.log"))
        addresses.append(f"127.0.0.1:{batcher_port}")
        metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
    # The router's /ready needs only one ready batcher, and it sends requests to ready ones
    # first: started once both have their workers, it polls both before it answers /ready,
    # so that the first requests of a run are spread over both engines.
    wait_until(
        lambda: all(worker_attached(url) for url in metrics_urls),
        [*workers, *batchers],
        timeout_s=300,
        what="the batchers' workers",
    )
    router = RouterConfig(
        model_dir=str(model),
        batcher_addresses=tuple(addresses),
        host="127.0.0.1",
        port=args.port,
        reuse_port=args.num_routers > 1,  # they share the port, as serve's do
    )
    router_cmd = [*role, "router", *flags.to_args(router)]
    tiers.append(
        [popen_logged(router_cmd, env, logs / f"router-{i}.log") for i in range(args.num_routers)]
    )
    wait_ready(f"http://127.0.0.1:{args.port}", [p for t in tiers for p in t], timeout_s=120)


@contextlib.contextmanager
def serving(policy, args, model, env, blocks, logs: Path) -> Iterator[None]:
    """The variant's server(s), ready at args.port; stopped on the way out, router first."""
    tiers: list[list[subprocess.Popen]] = []  # in starting order, so stopped in reverse
    try:
        if policy == "fcfs-dp2":
            start_fcfs_dp2(args, model, env, blocks, tiers, logs)
        else:
            start_serve(policy, args, model, env, blocks, tiers, logs)
        yield
    finally:
        stop(tiers[::-1])


def run_policy(policy, args, model, env, vocab, blocks, work, clock, servers_after, timings):
    """Serve this variant and run its benches: offline, then the online rates (--rate, and
    each --rate-fraction of the baseline's offline request rate, measured before). Results
    land in work/<variant>/{offline,online}/."""
    peer_run = policy == "aligned" and 0 < args.peer_requests != args.num_requests
    start = time.monotonic()
    with serving(policy, args, model, env, blocks, work / policy / "logs"):
        timings[f"{policy}_server_start_s"] = time.monotonic() - start
        print(f"{policy}: serving after {time.monotonic() - start:.0f} s", flush=True)
        if peer_run:  # short, and first: the timeouts below then share what is left
            timeout = clock.run_timeout(1, servers_after, args.timeout_s)
            cmd = bench_args(args, vocab, args.peer_requests, [math.inf], timeout)
            subprocess.run([*cmd, "--out", str(work / "aligned-peer")], env=env, check=False)
        num_runs = args.offline_repeats + len(args.rate) + len(args.rate_fraction)
        runs_left = num_runs * (1 + servers_after)
        timeout = clock.run_timeout(runs_left, servers_after, args.timeout_s)
        print(f"{policy}: {num_runs} runs, up to {timeout:.0f} s each", flush=True)
        start = time.monotonic()
        cmd = bench_args(args, vocab, args.num_requests, [math.inf], timeout)
        for k in range(1, args.offline_repeats + 1):
            out = work / policy / offline_part(k)
            subprocess.run([*cmd, "--out", str(out)], env=env, check=False)
        rates = [*args.rate, *fraction_rates(work, args.baseline, args.rate_fraction)]
        if rates:
            timeout = clock.run_timeout(len(rates) * (1 + servers_after), servers_after, timeout)
            cmd = bench_args(args, vocab, args.num_requests, rates, timeout)
            subprocess.run([*cmd, "--out", str(work / policy / "online")], env=env, check=False)
        timings[f"{policy}_bench_s"] = time.monotonic() - start


def fraction_rates(work: Path, baseline: str, fractions: list[float]) -> list[float]:
    """Each fraction of the baseline's offline request rate, rounded to 0.1 req/s, so that
    the online runs sit below, at and beyond its capacity whatever the hardware gives."""
    path = work / baseline / "offline" / "bench.json"
    if not fractions or not path.is_file():
        return []
    capacity = json.loads(path.read_text())["runs"][0]["summary"]["requests_per_s"]
    return [max(0.1, round(f * capacity, 1)) for f in fractions]


def run_peer(args, model: Path, env, work: Path, clock: Clock, timings) -> None:
    """transformers on --device, before any server holds it; bounded by --peer-timeout-s."""
    script = Path(__file__).with_name("hf_peer.py")
    cmd = [
        sys.executable, str(script), "--model", str(model), "--device", args.device,
        "--dtype", "float32" if args.tiny else "bfloat16", "--workload", args.workload,
        "--num-requests", str(args.peer_requests), "--timeout-s", str(args.peer_timeout_s),
        "--out", str(work / "peer.json"),
    ]  # fmt: skip
    start = time.monotonic()
    try:  # loading and warm-up come on top of the generation's own timeout
        subprocess.run(cmd, env=env, check=False, timeout=args.peer_timeout_s + 180)
    except subprocess.TimeoutExpired:
        print("peer: killed (load + warm-up + generation ran too long)", flush=True)
    timings["peer_s"] = time.monotonic() - start


# ---------------------------------------------------------------- the report (pure)


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
    variants are not paired: they ran on different servers, one after the other)."""
    offline = [by_variant for load, by_variant in runs.items() if load.startswith("offline")]
    tok_s = {
        variant: [r[variant]["summary"]["output_tokens_per_s"] for r in offline if variant in r]
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
            "num_failed": s["num_failed"] + s["num_not_sent"],
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
    if not set(compared) <= offline.keys():
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


def _x(value: float | None, target: float, met: bool | None) -> str:
    if value is None:
        return f"– (≥ {target:g}×: missed)"
    return f"**{value:.2f}×** (≥ {target:g}×: {'met' if met else 'missed'})"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    shape = SHAPES[report["model_shape"]]
    c = report["config"]
    baseline = c["baseline"]
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
        + (" (fcfs-dp2: half per batcher)" if "fcfs-dp2" in c["policies"] else "")
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
    lines += [
        "",
        f"| load | aligned ÷ {baseline} output tok/s | {baseline} ÷ aligned p99 TPOT | notes |",
        "|---|---|---|---|",
    ]
    for row in report["cells"]:
        throughput = _x(
            row.get("throughput_ratio"), shape.min_throughput_ratio, row.get("throughput_met")
        )
        tpot = _x(row.get("tpot_ratio"), shape.min_tpot_ratio, row.get("tpot_met"))
        lines.append(
            f"| {row['load']} | {throughput} | {tpot} | {'; '.join(row['notes']) or '–'} |"
        )
    spread = report.get("offline_spread")
    if spread is not None:
        lines += ["", offline_spread_line(spread, baseline, shape.min_throughput_ratio)]
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


def device_name(device: str) -> str:
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        return f"{len(line)} × {line[0]}" if line else device
    except (OSError, subprocess.CalledProcessError):
        return device


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (a dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prefetch-device", default="cuda:1")
    parser.add_argument(
        "--policies", nargs="+", choices=VARIANTS, default=["aligned", "fcfs-dp2"],
        help="the variants to run, in this order",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", choices=BASELINES, default="fcfs-dp2", help="what aligned is compared with"
    )
    parser.add_argument("--workload", default="paper-90")
    parser.add_argument("--num-requests", type=int, default=100, help="per run")
    parser.add_argument("--rate", type=float, action="append", default=[], help="req/s (repeat)")
    parser.add_argument(
        "--rate-fraction", type=float, action="append", default=[],
        help="a Poisson rate as this fraction of the baseline's offline req/s (repeat); the "
        "baseline then runs first",
    )  # fmt: skip
    parser.add_argument(
        "--offline-repeats",
        type=int,
        default=1,
        help="offline runs per variant (one offline run's makespan is set by its last "
        "prefilled requests: the ratio of one run varied 0.87-1.13x)",
    )
    parser.add_argument("--timeout-s", type=float, default=240, help="cap per bench run")
    parser.add_argument("--deadline-s", type=float, default=560, help="the whole call's")
    parser.add_argument("--pool-gib", type=float, help="CPU KV pool: 64, --tiny 0.5")
    parser.add_argument("--device-kv-gib", type=float, help="decode GPU's KV: 88, --tiny 0.25")
    parser.add_argument("--peer-requests", type=int, default=48, help="0: no peer")
    parser.add_argument("--peer-timeout-s", type=float, default=120, help="its generation")
    parser.add_argument(
        "--peer-json", default="", help="an earlier hf_peer.py result for these requests: reused"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--num-clients",
        type=int,
        default=4,
        help="bench client processes (one streams ~11-14k tok/s at most: bench/clients.py)",
    )
    parser.add_argument(
        "--num-routers",
        type=int,
        default=1,
        help="HTTP router processes of every variant, sharing --port (one makes ~19k tok/s)",
    )
    args = parser.parse_args()
    # The defaults fit an H200 pair's host; a dry run's tiny model needs next to nothing, and
    # on a small machine the full sizes cannot even be allocated.
    if args.pool_gib is None:
        args.pool_gib = 0.5 if args.tiny else 64
    if args.device_kv_gib is None:
        args.device_kv_gib = 0.25 if args.tiny else 88
    if len(args.policies) > 1 and args.baseline not in args.policies:
        parser.error(f"--baseline {args.baseline} is not among --policies: nothing to compare")
    if args.offline_repeats < 1:
        parser.error(f"--offline-repeats {args.offline_repeats}: at least 1")
    if "fcfs-dp2" in args.policies and not args.prefetch_device and args.device != "cpu":
        parser.error("fcfs-dp2 needs a second GPU: --prefetch-device")
    if args.rate_fraction:  # its offline run sets the rates of every variant
        if args.baseline not in args.policies:
            parser.error(f"--rate-fraction needs the baseline {args.baseline} among --policies")
        args.policies.sort(key=lambda v: v != args.baseline)
    clock = Clock(args.deadline_s)
    shape = SHAPES[args.model_shape]
    env = environment()
    device = device_name(args.device)
    timings: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(dir=model_root(shape, args.pool_gib, args.tiny)) as tmp,
        tempfile.TemporaryDirectory() as work_dir,
    ):
        model, work = Path(tmp) / f"{args.model_shape}-random", Path(work_dir)
        write_model(model, args.model_shape, shape, env, args.tiny, args.device)
        timings["model_write_s"] = clock.elapsed()
        print(f"model written to {model} in {timings['model_write_s']:.0f} s", flush=True)
        vocab = ModelConfig.from_dir(model).vocab_size
        blocks = device_blocks(model, args.device_kv_gib)
        if args.peer_json:  # our engine then runs the requests the peer ran
            shutil.copy(args.peer_json, work / "peer.json")
            args.peer_requests = json.loads(Path(args.peer_json).read_text())["num_requests"]
        elif args.peer_requests:
            run_peer(args, model, env, work, clock, timings)
            write_outputs(args, work, timings, blocks, device)
        for i, policy in enumerate(args.policies):
            servers_after = len(args.policies) - i - 1
            try:
                run_policy(
                    policy, args, model, env, vocab, blocks, work, clock, servers_after, timings
                )
            except (RuntimeError, TimeoutError) as e:  # its server failed to start, or died
                # the next variants still run; the report says why this one has no cells, and
                # its logs (work/<variant>/logs) go into the .tar.gz with the rest
                print(f"{policy}: failed: {e}", flush=True)
                (work / policy).mkdir(parents=True, exist_ok=True)
                (work / policy / FAILED).write_text(f"{type(e).__name__}: {e}")
            timings.pop("total_s", None)  # kept last
            timings["total_s"] = clock.elapsed()
            markdown = write_outputs(args, work, timings, blocks, device)
    print("\n" + markdown, flush=True)


if __name__ == "__main__":
    main()
