"""Batch scheduling: the core (admission, plan, update), the plan it hands its executor,
and the pluggable policies."""

from alignedserve.batcher.scheduler.aligned import AlignedPolicy
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.core import QueueFullError, Scheduler
from alignedserve.batcher.scheduler.fcfs import FcfsPolicy
from alignedserve.batcher.scheduler.plan import BatchPlan


def make_scheduler(config: SchedulerConfig, **kw) -> Scheduler:
    policy = AlignedPolicy(config) if config.policy == "aligned" else FcfsPolicy()
    return Scheduler(config, policy, **kw)


__all__ = [
    "BatchPlan",
    "QueueFullError",
    "Scheduler",
    "SchedulerConfig",
    "make_scheduler",
]
