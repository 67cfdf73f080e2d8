"""Hashes of 600 plans of the aligned scheduler in 12 configurations (thirty-fifth session):
run from one tree with the per-token bound off (argument 0) and from a tree before it, the
hashes must be equal. `PYTHONPATH=<tree's package parent> python plan_digest.py 0`."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import schedule_time as st

from alignedserve.batcher.scheduler import SchedulerConfig

extra = {}
if "max_pool_wait_per_token_s" in SchedulerConfig.__dataclass_fields__:
    extra["max_pool_wait_per_token_s"] = float(sys.argv[1])
for n in (3000, 20000):
    for starve in (0.3, 5.0, 1e9):
        for order in ("fit-groups", "shortest-first"):
            sched = st.build(n, dict(starvation_s=starve, load_order=order, **extra))
            now, _ = st.fill(sched)
            h = hashlib.sha256()
            for _ in range(600):
                plan = sched.schedule(now, prefill_token_budget=st.UNBOUNDED)
                h.update(
                    repr(
                        (plan.decode, plan.load, plan.evict, plan.prefetch, plan.is_switch)
                    ).encode()
                )
                st.apply(sched, plan, now)
                now += st.STEP_S
            print(n, starve, order, h.hexdigest()[:16], flush=True)
