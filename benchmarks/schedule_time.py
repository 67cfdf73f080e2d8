"""Aligned scheduler: CPU time of one scheduling decision with a large pool of requests.

Target (issue): a scheduling decision (`Scheduler.schedule`) takes < 1 ms at the 99th
percentile with 100k requests pooled.

For each N (default 10k and 100k):
1. an aligned Scheduler sized so that every request fits the CPU pool (decode GPU of ~850k KV
   tokens, max_inflight/max_waiting 200k) gets N requests from the paper's 90 %-short mix
   (`paper_mix(N, 0.9, seed=0)`: prompts 32..1023 or 1024..8192, outputs 16..512);
2. fill: schedule with an unbounded prefill budget and apply each plan with one token per
   prefilled/decoded request, until nothing waits, so all N are past prefill, in the pool;
3. time `--cycles` steady-state decision cycles, each: `schedule(now)` (timed), then
   `update(plan, tokens, now)` (timed separately), then `policy.on_prefetch_done()` if the plan
   started a prefetch (the executor reports it complete by the next step); finished requests
   are popped from the store, as the simulator does; `now` advances 0.02 s a cycle.
Prints p50/p99/max of both times in ms, overall and by kind of cycle (one that moved
requests between pool and GPU — load/evict/prefetch — or a plain decode step), pooled
requests at start and end, mean decode batch size, switches, the slowest cycles, and the
cyclic GC's pauses (all, and those that fell inside a timed schedule()).

    .venv/bin/python benchmarks/schedule_time.py [--pooled N ...] [--cycles C] [--profile] \
        [--starvation-s S] [--load-order fit-groups|shortest-first]

--profile: afterwards, run the cycles again on a fresh scheduler under cProfile (schedule()
calls only) and print the top functions by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import platform
import pstats
import time

import numpy as np

from alignedserve.batcher.request import RequestState
from alignedserve.batcher.scheduler import SchedulerConfig, make_scheduler
from alignedserve.batcher.sim.workload import paper_mix
from alignedserve.common.policy import LOAD_ORDERS
from alignedserve.common.sampling_params import SamplingParams

BLOCK_TOKENS = 16
STEP_S = 0.02
UNBOUNDED = 1 << 60


def build(n: int, overrides: dict):
    """An aligned scheduler with n requests admitted (all waiting for prefill)."""
    requests = paper_mix(n, 0.9, seed=0)
    blocks = sum(-(-(r.prompt_tokens + r.output_tokens) // BLOCK_TOKENS) for r in requests)
    config = SchedulerConfig(
        policy="aligned",
        block_tokens=BLOCK_TOKENS,
        num_pool_blocks=blocks + blocks // 20 + 1024,  # all fit: no preemption
        gpu_kv_tokens=850_000,
        max_inflight=200_000,
        max_waiting=200_000,
        prefill_tokens_per_step=UNBOUNDED,
        **overrides,
    )
    sched = make_scheduler(config)
    for r in requests:
        params = SamplingParams(max_tokens=r.output_tokens, temperature=0, ignore_eos=True)
        sched.add_request(r.request_id, range(r.prompt_tokens), params, 0.0)
    return sched


def tokens_for(plan) -> dict[str, int]:
    tokens = dict.fromkeys(plan.decode, 0)
    tokens.update((rid, 0) for rid, _ in plan.all_prefill)
    return tokens


def apply(sched, plan, now: float) -> None:
    for r in sched.update(plan, tokens_for(plan), now):
        sched.store.pop(r.request_id)
    if plan.prefetch:
        sched.policy.on_prefetch_done()


def fill(sched) -> tuple[float, int]:
    """Prefill everything into the pool; returns (now, steps)."""
    now, steps = 0.0, 0
    while sched.waiting:
        plan = sched.schedule(now, prefill_token_budget=UNBOUNDED)
        apply(sched, plan, now)
        now += STEP_S
        steps += 1
        if steps > 10_000:
            raise RuntimeError(f"fill stuck: {len(sched.waiting)} still waiting")
    return now, steps


def ms(values_ns) -> str:
    a = np.asarray(values_ns, dtype=np.float64) / 1e6
    if not len(a):
        return "        (none)"
    p50, p99 = np.percentile(a, [50, 99])
    return f"p50 {p50:7.3f}  p99 {p99:7.3f}  max {a.max():7.3f}"


def gc_collections() -> list[int]:
    return [s["collections"] for s in gc.get_stats()]


class GcPauses:
    """Cyclic-GC pauses (generation, ns), to tell collector pauses from scheduling work."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, int]] = []
        self._start = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.pauses.append((info["generation"], time.perf_counter_ns() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def run(n: int, cycles: int, overrides: dict, profile: cProfile.Profile | None = None) -> dict:
    t0 = time.perf_counter()
    sched = build(n, overrides)
    t_build = time.perf_counter() - t0
    now, fill_steps = fill(sched)
    t_fill = time.perf_counter() - t0 - t_build
    gc.collect()
    counts = sched.store.count_by_state()
    start = {s.value: counts[s] for s in RequestState if counts[s]}
    switches0, gc0 = sched.num_switches, gc_collections()
    sched_ns, update_ns, moved, batch, sizes = [], [], [], [], []
    gc_in_schedule: list[tuple[int, int]] = []
    with GcPauses() as pauses:
        for _ in range(cycles):
            if profile is not None:
                profile.enable()
            seen = len(pauses.pauses)
            t1 = time.perf_counter_ns()
            plan = sched.schedule(now)
            t2 = time.perf_counter_ns()
            gc_in_schedule += pauses.pauses[seen:]
            if profile is not None:
                profile.disable()
            tokens = tokens_for(plan)
            t3 = time.perf_counter_ns()
            done = sched.update(plan, tokens, now)
            t4 = time.perf_counter_ns()
            for r in done:
                sched.store.pop(r.request_id)
            if plan.prefetch:
                sched.policy.on_prefetch_done()
            sched_ns.append(t2 - t1)
            update_ns.append(t4 - t3)
            moved.append(bool(plan.load or plan.evict or plan.prefetch or plan.is_switch))
            batch.append(len(plan.decode))
            sizes.append((len(plan.load), len(plan.evict), len(plan.prefetch), plan.is_switch))
            now += STEP_S
    counts = sched.store.count_by_state()
    return dict(
        n=n,
        t_build=t_build,
        t_fill=t_fill,
        fill_steps=fill_steps,
        start=start,
        end={s.value: counts[s] for s in RequestState if counts[s]},
        pooled_start=start.get("pooled", 0),
        pooled_end=counts[RequestState.POOLED],
        sched_ns=np.array(sched_ns),
        update_ns=np.array(update_ns),
        moved=np.array(moved),
        batch=np.array(batch),
        sizes=sizes,
        starvation_s=sched.config.starvation_s,
        load_order=sched.config.load_order,
        now_end=now,
        switches=sched.num_switches - switches0,
        gc=[b - a for a, b in zip(gc0, gc_collections(), strict=True)],
        gc_pauses=pauses.pauses,
        gc_in_schedule=gc_in_schedule,
    )


def report(res: dict, cycles: int) -> None:
    s, u, moved = res["sched_ns"], res["update_ns"], res["moved"]
    p99 = np.percentile(s, 99) / 1e6
    print(
        f"\n== N = {res['n']:,} requests ({cycles} cycles to t = {res['now_end']:.0f} s, "
        f"starvation_s = {res['starvation_s']:g}, load_order = {res['load_order']})"
    )
    print(
        f"setup: build {res['t_build']:.1f} s, fill {res['t_fill']:.1f} s "
        f"({res['fill_steps']} steps)"
    )
    print(f"pooled requests: start {res['pooled_start']:,}  end {res['pooled_end']:,}")
    print(f"  states at start: {res['start']}")
    print(f"  states at end:   {res['end']}")
    print(f"schedule() ms   all        : {ms(s)}")
    print(f"                moving {moved.sum():5d}: {ms(s[moved])}")
    print(f"                plain  {(~moved).sum():5d}: {ms(s[~moved])}")
    print(f"update()   ms   all        : {ms(u)}")
    print(f"                moving {moved.sum():5d}: {ms(u[moved])}")
    print(f"                plain  {(~moved).sum():5d}: {ms(u[~moved])}")
    nonzero = res["batch"][res["batch"] > 0]
    print(
        f"decode batch: mean {res['batch'].mean():.1f} "
        f"(mean {nonzero.mean() if len(nonzero) else 0:.1f} over {len(nonzero)} non-empty steps)"
    )
    worst = np.argsort(s)[::-1][:3]
    print(
        "slowest schedule() cycles (#, ms, load/evict/prefetch/switch): "
        + ", ".join(f"#{i} {s[i] / 1e6:.2f} {res['sizes'][i]}" for i in worst)
    )
    print(f"switches: {res['switches']}   gc collections (gen0/1/2): {res['gc']}")
    for label, pauses in (("all", res["gc_pauses"]), ("inside schedule()", res["gc_in_schedule"])):
        ns = [p for _, p in pauses]
        if ns:
            print(
                f"gc pauses, {label}: {len(ns)} (gens {sorted({g for g, _ in pauses})}), "
                f"total {sum(ns) / 1e6:.1f} ms, max {max(ns) / 1e6:.2f} ms"
            )
    verdict = "MET" if p99 < 1.0 else "MISSED"
    print(f"target schedule() p99 < 1 ms: {verdict} ({p99:.3f} ms)")


def profile_run(n: int, cycles: int, overrides: dict, top: int) -> None:
    prof = cProfile.Profile()
    run(n, cycles, overrides, profile=prof)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        text = out.getvalue()
        body = text[text.index("   ncalls") :] if "   ncalls" in text else text
        print(f"\n-- cProfile of schedule(), N = {n:,}, {cycles} cycles, by {key}:")
        print(body.rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pooled", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="cProfile schedule() afterwards")
    ap.add_argument(
        "--starvation-s",
        type=float,
        default=None,
        help="override SchedulerConfig.starvation_s (default: the config's). With the "
        "default 5 s, every pooled request starves from cycle 250 on (all entered at t=0)",
    )
    ap.add_argument(
        "--load-order",
        choices=LOAD_ORDERS,
        default=None,
        help="override SchedulerConfig.load_order (default: the config's)",
    )
    ap.add_argument("--top", type=int, default=25, help="profile lines to print")
    args = ap.parse_args()
    overrides = {
        name: value
        for name, value in (("starvation_s", args.starvation_s), ("load_order", args.load_order))
        if value is not None
    }
    print(f"python {platform.python_version()} on {platform.machine()}, numpy {np.__version__}")
    for n in args.pooled:
        report(run(n, args.cycles, overrides), args.cycles)
    if args.profile:
        for n in args.pooled:
            profile_run(n, args.cycles, overrides, args.top)


if __name__ == "__main__":
    main()
