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
- aligned-cut: aligned whose prefill GPU's batches cut their last prompt where the prefill
  budget ends (--no-prefill-whole-prompts; the batcher's rule before session 30), so the
  prompt's next chunk copies its KV back in from the pool first;
- aligned-fitgroups: aligned whose pooled requests that fit a resident group load first,
  then the oldest (--load-order fit-groups; the default before session 32), instead of
  sorting that order by the max_tokens their clients set (shortest-first);
- aligned-pool80: aligned with an 80 GiB CPU pool, about the decode GPU's 88 GiB of KV,
  whatever --pool-gib gives the others: fewer requests wait in the pool between their turns
  on the decode GPU, so under overload they wait for their prefill instead (the pool's size
  trades tokens/s for the tail of TPOT; the simulator predicts it, session 36);
- aligned-dp2: aligned data-parallel on the same two GPUs, as fcfs-dp2 below, each engine
  alone on its GPU (prefill mixed into its steps, loads over its own link): what the pair's
  split into a prefill GPU and a decode GPU costs or gains;
- fcfs-dp2 (the default baseline): fcfs data-parallel on the same two GPUs, as a deployment
  scales it: two workers, one per GPU (--device and --prefetch-device), each with its own
  fcfs batcher (which reserves no CPU pool: its KV stays on its GPU, all of --device-kv-gib;
  before the thirty-eighth session half of --pool-gib each, which capped it at 80 GiB of 88
  with --pool-gib 160), behind one router that sends each request to the
  least loaded batcher, by context tokens. On CPU with no --prefetch-device, both workers run
  on --device;
- fcfs-dp2-byrequests: fcfs-dp2 whose router counts load in live requests (--balance-by
  requests; for fcfs, which pools nothing, the count used before session 33), which splits a
  burst by number, not by work.
- vllm: vLLM's OpenAI server on --device (its packages under --vllm-site: vLLM is not
  installed on the GPU machines, benchmarks/vllm_bundle.sh makes the folder), with its
  defaults for the GPU, measured by the same bench through the same HTTP API. (Its
  FlashInfer top-k/top-p sampler is off: compiling it took ~2 minutes of each start, and the
  bench's greedy requests never reach it; e2e_servers.start_vllm.) As --baseline,
  each variant's ratios to it are reported, not judged by issue 6's targets (which are
  against fcfs).
- vllm-samekv: vllm with our engines' device KV (--device-kv-gib, 88 GiB by default; vllm's
  0.9 of an H200 gives it ~100 GiB): the engines compared at equal KV memory. (Before the
  thirty-eighth session's last commits fcfs's CPU pool capped its device's KV: --pool-gib 48
  left it 48 GiB; fcfs now reserves no pool.)
- vllm-dp2: vLLM's own data parallelism (--data-parallel-size 2) over --device and
  --prefetch-device, each engine with our device KV: vLLM as fcfs-dp2 deploys our engines,
  the pair's peer for issue 6's stretch.

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
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_env import ROOT, child_pythonpath, import_alignedserve
from e2e_report import (
    FAILED,
    SHAPES,
    VARIANTS,
    Shape,
    is_dp2,
    offline_part,
    write_outputs,
)
from e2e_servers import serving

import_alignedserve()
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402

BASELINES = ("fcfs", "fcfs-dp2", "vllm", "vllm-samekv", "vllm-dp2")
TINY_VOCAB = 8192  # a dry run's vocabulary: as in the full ones, nearly every id is a word
SERVER_OVERHEAD_S = 60.0  # reserved for each server still to start and stop


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


def bench_args(
    args, vocab: int, workload: str, num_requests: int, rates: list[float], timeout_s: float
):
    """`alignedserve bench` against the server at args.port (here and in phase_compare.py)."""
    return [
        sys.executable, "-m", "alignedserve", "bench",
        "--base-url", f"http://127.0.0.1:{args.port}", "--vocab-size", str(vocab),
        "--workload", workload, "--num-requests", str(num_requests),
        *[x for r in rates for x in ("--rate", str(r))], "--timeout-s", f"{timeout_s:.0f}",
        "--num-clients", str(args.num_clients),
    ]  # fmt: skip


def run_policy(
    policy, args, model, env, vocab, blocks, work, clock, servers_after, timings, report
):
    """Serve this variant and run its benches: offline, then the online rates (--rate, and
    each --rate-fraction of the baseline's offline request rate, measured before). Results
    land in work/<variant>/{offline,online}/; `report()` writes the outputs once the benches
    are done, before the server stops (an OPT-13B server takes a while to), so a call cut
    short there still has them."""
    peer_run = policy == "aligned" and 0 < args.peer_requests != args.num_requests
    start = time.monotonic()
    with serving(policy, args, model, env, blocks, work / policy / "logs"):
        timings[f"{policy}_server_start_s"] = time.monotonic() - start
        print(f"{policy}: serving after {time.monotonic() - start:.0f} s", flush=True)
        if peer_run:  # short, and first: the timeouts below then share what is left
            timeout = clock.run_timeout(1, servers_after, args.timeout_s)
            cmd = bench_args(args, vocab, args.workload, args.peer_requests, [math.inf], timeout)
            subprocess.run([*cmd, "--out", str(work / "aligned-peer")], env=env, check=False)
        num_runs = args.offline_repeats + len(args.rate) + len(args.rate_fraction)
        runs_left = num_runs * (1 + servers_after)
        timeout = clock.run_timeout(runs_left, servers_after, args.timeout_s)
        print(f"{policy}: {num_runs} runs, up to {timeout:.0f} s each", flush=True)
        start = time.monotonic()
        cmd = bench_args(args, vocab, args.workload, args.num_requests, [math.inf], timeout)
        for k in range(1, args.offline_repeats + 1):
            out = work / policy / offline_part(k)
            subprocess.run([*cmd, "--out", str(out)], env=env, check=False)
        rates = [*args.rate, *fraction_rates(work, args.baseline, args.rate_fraction)]
        if rates:
            timeout = clock.run_timeout(len(rates) * (1 + servers_after), servers_after, timeout)
            cmd = bench_args(args, vocab, args.workload, args.num_requests, rates, timeout)
            subprocess.run([*cmd, "--out", str(work / policy / "online")], env=env, check=False)
        timings[f"{policy}_bench_s"] = time.monotonic() - start
        report()


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


def device_name(device: str) -> str:
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        return f"{len(line)} × {line[0]}" if line else device
    except (OSError, subprocess.CalledProcessError):
        return device


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """What the servers and the bench need, here and in phase_compare.py."""
    parser.add_argument("--out", default=".")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (a dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--device-kv-gib", type=float, help="decode GPU's KV: 88, --tiny 0.25")
    parser.add_argument(
        "--vllm-site", default="", help="a folder holding vLLM and its packages (the vllm variant)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--num-clients",
        type=int,
        default=4,
        help="bench client processes (one streams ~11-14k tok/s at most: bench/clients.py)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser)
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
    parser.add_argument("--peer-requests", type=int, default=48, help="0: no peer")
    parser.add_argument("--peer-timeout-s", type=float, default=120, help="its generation")
    parser.add_argument(
        "--peer-json", default="", help="an earlier hf_peer.py result for these requests: reused"
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
    for variant in args.policies:
        if is_dp2(variant) and not args.prefetch_device and args.device != "cpu":
            parser.error(f"{variant} needs a second GPU: --prefetch-device")
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
        report = functools.partial(write_outputs, args, work, timings, blocks, device)
        if args.peer_json:  # our engine then runs the requests the peer ran
            shutil.copy(args.peer_json, work / "peer.json")
            args.peer_requests = json.loads(Path(args.peer_json).read_text())["num_requests"]
        elif args.peer_requests:
            run_peer(args, model, env, work, clock, timings)
            report()
        for i, policy in enumerate(args.policies):
            servers_after = len(args.policies) - i - 1
            try:
                run_policy(policy, args, model, env, vocab, blocks, work, clock, servers_after,
                           timings, report)  # fmt: skip
            except (RuntimeError, TimeoutError) as e:  # its server failed to start, or died
                # the next variants still run; the report says why this one has no cells, and
                # its logs (work/<variant>/logs) go into the .tar.gz with the rest
                print(f"{policy}: failed: {e}", flush=True)
                (work / policy).mkdir(parents=True, exist_ok=True)
                (work / policy / FAILED).write_text(f"{type(e).__name__}: {e}")
            timings.pop("total_s", None)  # kept last
            timings["total_s"] = clock.elapsed()
            markdown = report()
    print("\n" + markdown, flush=True)


if __name__ == "__main__":
    main()
