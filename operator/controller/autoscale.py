"""How many replicas a pool (workers or routers) should have: pure decisions over observed
load, with the HorizontalPodAutoscaler's behaviour (fast up, stabilised down). No I/O and no
clock: the caller passes the time and keeps the state between decisions.

The signal is the **queue**: requests waiting for prefill, summed over the pool's batchers,
plus requests held by routers while no batcher is ready. Running and pooled requests are not
load to scale on: they are work already placed, and the aligned batcher wants them many (a
batch needs dozens of partners of one length). They count in two other ways instead:

- the KV they hold: shrinking the pool below ``ceil(ready × kv_pool_usage)`` replicas would
  leave the remaining pools over-full at the present load, so the pool never goes below that;
- a pool holding any request never goes to zero: scale-to-zero waits until it is idle.

The recommendation is ``ceil(queue / target_queue_per_replica)`` — absolute, not relative to
the current size, so repeated decisions while new replicas start cannot run away — raised to
one more than the *ready* replicas while the p99 time per output token is above its target
(a replica still starting already counts as that one more), raised to the KV floor, and
clamped to [floor, max_replicas], where the floor is max(min_replicas, 1), or 0 while the
pool is idle and may scale to zero.

Up: at once, by at most ×max_scale_up_factor (at least +1) per decision. Down: only to the
highest recommendation of the last scale_down_stabilization_s (hysteresis: load that
dropped must stay low for a whole window before a replica goes), and never while a replica
is not ready yet (a starting pod is not idle capacity). The bounds win over both rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from alignedserve.common.errors import ConfigError

Direction = Literal["up", "down", "none"]


@dataclass(frozen=True)
class PoolPolicy:
    min_replicas: int
    max_replicas: int
    target_queue_per_replica: float
    target_p99_tpot_s: float | None  # None: latency does not scale the pool
    scale_down_stabilization_s: float
    scale_to_zero: bool  # an idle pool may go to 0 replicas (min_replicas applies while busy)
    max_scale_up_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ConfigError(f"min_replicas={self.min_replicas} must be >= 0")
        if self.min_replicas == 0 and not self.scale_to_zero:
            raise ConfigError("min_replicas=0 needs scale_to_zero=True")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError(
                f"max_replicas={self.max_replicas} must be >= max(min_replicas, 1)"
                f" = {max(self.min_replicas, 1)}"
            )
        if not self.target_queue_per_replica > 0:
            raise ConfigError(
                f"target_queue_per_replica={self.target_queue_per_replica} must be > 0"
            )
        if self.target_p99_tpot_s is not None and not self.target_p99_tpot_s > 0:
            raise ConfigError(f"target_p99_tpot_s={self.target_p99_tpot_s} must be > 0")
        if not self.scale_down_stabilization_s >= 0:
            raise ConfigError(
                f"scale_down_stabilization_s={self.scale_down_stabilization_s} must be >= 0"
            )
        if not self.max_scale_up_factor >= 1:
            raise ConfigError(f"max_scale_up_factor={self.max_scale_up_factor} must be >= 1")


@dataclass(frozen=True)
class PoolObservation:
    now_s: float  # any clock, the same for every decision of one state, never going back
    current_replicas: int  # the pool's desired size now (the Deployment's spec.replicas)
    ready_replicas: int
    queue: int  # waiting requests over the pool, plus requests held by routers
    running: int
    pooled: int
    p99_tpot_s: float | None  # None: no latency signal (no traffic, or no Prometheus)
    kv_pool_usage: float  # mean over the ready replicas, 0-1

    def __post_init__(self) -> None:
        for name in ("current_replicas", "ready_replicas", "queue", "running", "pooled"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.kv_pool_usage <= 1:
            raise ValueError(f"kv_pool_usage={self.kv_pool_usage} outside 0..1")

    @property
    def is_idle(self) -> bool:
        return self.queue == 0 and self.running == 0 and self.pooled == 0


@dataclass(frozen=True)
class AutoscaleState:
    """Recommendations of the stabilization window, oldest first: (time, replicas)."""

    recommendations: tuple[tuple[float, int], ...]

    @classmethod
    def initial(cls, now_s: float, current_replicas: int) -> AutoscaleState:
        # A fresh state (a new resource, or an operator restart) counts the present size as
        # recommended now, so nothing scales down before a whole window has been observed.
        return cls(((now_s, current_replicas),))


@dataclass(frozen=True)
class Decision:
    desired_replicas: int
    reason: str
    direction: Direction


def _min_replicas(policy: PoolPolicy, obs: PoolObservation) -> int:
    return 0 if policy.scale_to_zero and obs.is_idle else max(policy.min_replicas, 1)


def recommend(policy: PoolPolicy, obs: PoolObservation) -> tuple[int, str]:
    """The replicas the observation asks for now, within the bounds, before the rate and
    stabilization rules; and why."""
    replicas = math.ceil(obs.queue / policy.target_queue_per_replica)
    why = f"queue {obs.queue} at {policy.target_queue_per_replica:g}/replica"
    target = policy.target_p99_tpot_s
    is_slow = target is not None and obs.p99_tpot_s is not None and obs.p99_tpot_s > target
    # (one more than ready: a replica still starting is already the answer)
    if is_slow and obs.ready_replicas > 0 and obs.ready_replicas + 1 > replicas:
        replicas = obs.ready_replicas + 1
        why = f"p99 TPOT {obs.p99_tpot_s:.3g} s > {target:g} s: one more than ready"
    # (less a rounding tolerance: usage arrives as a float32 fraction)
    kv_floor = math.ceil(obs.ready_replicas * obs.kv_pool_usage - 1e-6)
    if kv_floor > replicas:
        replicas = kv_floor
        why = f"KV pools {obs.kv_pool_usage:.0%} used on {obs.ready_replicas} ready"
    floor = _min_replicas(policy, obs)
    if replicas < floor:
        replicas, why = floor, f"{why}; min {floor}"
    elif replicas > policy.max_replicas:
        replicas, why = policy.max_replicas, f"{why}; max {policy.max_replicas}"
    return replicas, why


def decide(
    policy: PoolPolicy, state: AutoscaleState, obs: PoolObservation
) -> tuple[Decision, AutoscaleState]:
    """The decision for `obs`, and the state to pass with the next observation."""
    recommended, why = recommend(policy, obs)
    window = policy.scale_down_stabilization_s
    kept = tuple((t, r) for t, r in state.recommendations if obs.now_s - t < window)
    new_state = AutoscaleState((*kept, (obs.now_s, recommended)))
    current = obs.current_replicas
    if recommended > current:
        limit = max(math.ceil(current * policy.max_scale_up_factor), current + 1)
        desired = min(recommended, limit)
        if desired < recommended:
            why = f"{why}: {recommended}, limited to {desired} this step"
    else:
        stable = max(r for _, r in new_state.recommendations)
        desired = min(current, stable)
        if desired < current and obs.ready_replicas < current:
            desired = current
            why = f"{why}; {current - obs.ready_replicas} replicas not ready yet: no scale-down"
        elif stable > recommended:
            why = f"{why}; {stable} recommended within {window:g} s"
    # The bounds win over the rate and stabilization rules (the policy may have changed).
    bounded = max(_min_replicas(policy, obs), min(desired, policy.max_replicas))
    if bounded != desired:
        why = f"{why}; {bounded} within the bounds"
        desired = bounded
    direction: Direction = "up" if desired > current else "down" if desired < current else "none"
    return Decision(desired, why, direction), new_state
