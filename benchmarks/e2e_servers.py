"""The servers of benchmarks/gpu_e2e.py's variants: `alignedserve serve` for one engine
(aligned and its variants, fcfs), or two engines of one GPU each behind one router
(fcfs-dp2, aligned-dp2), each process logging to a file; started, waited for until ready,
and stopped, router first.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from device_env import import_alignedserve
from e2e_report import PEER_SERVERS, is_dp2

import_alignedserve()
from alignedserve.common import flags  # noqa: E402
from alignedserve.common.metrics import PREFIX  # noqa: E402
from alignedserve.router.config import RouterConfig  # noqa: E402
from alignedserve.serve import (  # noqa: E402
    EngineSettings,
    ServeConfig,
    batcher_args,
    batcher_config,
    free_port,
    worker_args,
)

# the parts of a variant's name after its policy, and the serve flags each adds: -solo, the
# prefetch GPU only prefills; -turns, the decode GPU prefills too; -sync, the batcher waits for
# each answer; -serial, the worker answers each step before it queues the next; -wait1, no
# pooled request waits more than 1 s for a batch (5 s by default); -cut, the prefill device's
# batches cut their last prompt at the budget (before session 30); -fitgroups, pooled
# requests fitting a resident group load first, then the oldest (the default before session 32)
PART_SETTINGS = {
    "solo": {"prefill_decode_blocks": 0},
    "turns": {"decode_prefill_share": 0.5},
    "sync": {"max_steps_in_flight": 1},
    "serial": {"overlap_steps": False},
    "wait1": {"starvation_s": 1.0},
    "cut": {"prefill_whole_prompts": False},
    "fitgroups": {"load_order": "fit-groups"},
    "pool80": {"pool_gib": 80.0},
}


def http_get(url: str) -> str | None:
    """The body of a 200 answer; None for any other answer or none."""
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


def start_serve(policy, args, model, env, blocks, tiers, logs: Path) -> None:
    """`alignedserve serve`: router, batcher and worker under one process (its log and its
    children's in logs/serve.log)."""
    more = {k: v for part in policy.split("-")[1:] for k, v in PART_SETTINGS[part].items()}
    config = ServeConfig(
        **{
            "model": str(model),
            "device": args.device,
            "prefetch_device": args.prefetch_device,
            "policy": policy.split("-")[0],
            "port": args.port,
            "pool_gib": args.pool_gib,
            "num_device_blocks": blocks,
            "num_routers": args.num_routers,
            **more,  # a variant's settings win, the pool's size included
        }
    )
    cmd = [sys.executable, "-m", "alignedserve", "serve", *flags.to_args(config)]
    tiers.append([popen_logged(cmd, env, logs / "serve.log")])
    wait_ready(f"http://127.0.0.1:{args.port}", tiers[0], timeout_s=300)


def popen_logged(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The process started with its output (stdout and stderr) in the file `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_dp2(policy, args, model, env, blocks, tiers, logs: Path, balance_by: str) -> None:
    """Two workers and batchers of `policy`, one pair per device (an aligned one alone on its
    GPU: prefill mixed into its steps, loads over its own link), behind one router balancing
    by `balance_by` (RouterConfig.balance_by). Each list joins
    `tiers` before its processes start, so that any started are stopped if a later one fails.
    Each process logs to a file of its own in `logs` (worker-0.log, ...)."""
    role = [sys.executable, "-m", "alignedserve", "serve"]
    workers: list[subprocess.Popen] = []
    batchers: list[subprocess.Popen] = []
    tiers += [workers, batchers]
    addresses, metrics_urls = [], []
    for i, device in enumerate((args.device, args.prefetch_device or args.device)):
        worker_port, batcher_port, metrics_port = free_port(), free_port(), free_port()
        # Half the pool each: the CPU pools' host memory totals the single-server variants'
        # (aligned-dp2's; an fcfs batcher reserves none).
        settings = EngineSettings(
            device=device, policy=policy, num_device_blocks=blocks, pool_gib=args.pool_gib / 2
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
        balance_by=balance_by,
    )
    router_cmd = [*role, "router", *flags.to_args(router)]
    tiers.append(
        [popen_logged(router_cmd, env, logs / f"router-{i}.log") for i in range(args.num_routers)]
    )
    wait_ready(f"http://127.0.0.1:{args.port}", [p for t in tiers for p in t], timeout_s=120)


def start_vllm(policy, args, model: Path, env: dict[str, str], tiers, logs: Path) -> None:
    """vLLM's OpenAI server on args.device, from the packages under args.vllm_site (put first
    on its path: vLLM pins its own FastAPI), with its defaults for the GPU (0.9 of its memory)
    or, as vllm-samekv, our engines' device KV (--device-kv-gib); as vllm-dp2, vLLM's own
    data parallelism over args.device and args.prefetch_device, each engine with our device KV
    (fcfs-dp2's setup); ready once it lists its model. The environment is ours, NCCL's
    settings (NVLink multicast off) included."""
    if not args.vllm_site:
        raise RuntimeError("the vllm variant needs --vllm-site (vLLM and its packages)")
    child = dict(env)
    child["PYTHONPATH"] = ":".join(p for p in (args.vllm_site, env.get("PYTHONPATH")) if p)
    devices = [args.device, args.prefetch_device] if policy == "vllm-dp2" else [args.device]
    child["CUDA_VISIBLE_DEVICES"] = ",".join(d.removeprefix("cuda:") or "0" for d in devices)
    # vLLM's start samples once with top-k/top-p (_dummy_sampler_run), which compiles
    # FlashInfer's sampling kernels from source (their prebuilt cubins are not bundled): ~2 of
    # its ~4 minutes. The bench's requests are greedy, and vLLM decides all-greedy batches by
    # argmax before any top-k/top-p sampler, so serving is the same with its PyTorch sampler.
    child["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(args.port), "--dtype", "bfloat16",
    ]  # fmt: skip
    if policy == "vllm-dp2":
        cmd += ["--data-parallel-size", "2"]
    if policy in ("vllm-samekv", "vllm-dp2"):
        cmd += ["--kv-cache-memory-bytes", str(int(args.device_kv_gib * 2**30))]
    else:
        cmd += ["--gpu-memory-utilization", "0.9"]
    tiers.append([popen_logged(cmd, child, logs / "vllm.log")])
    url = f"http://127.0.0.1:{args.port}"
    wait_until(lambda: http_get(f"{url}/v1/models") is not None, tiers[0], 540, url)


@contextlib.contextmanager
def serving(policy, args, model, env, blocks, logs: Path) -> Iterator[None]:
    """The variant's server(s), ready at args.port; stopped on the way out, router first."""
    tiers: list[list[subprocess.Popen]] = []  # in starting order, so stopped in reverse
    try:
        if policy in PEER_SERVERS:
            start_vllm(policy, args, model, env, tiers, logs)
        elif is_dp2(policy):
            balance_by = "requests" if policy.endswith("-byrequests") else "tokens"
            start_dp2(policy.split("-")[0], args, model, env, blocks, tiers, logs, balance_by)
        else:
            start_serve(policy, args, model, env, blocks, tiers, logs)
        yield
    finally:
        stop(tiers[::-1])
