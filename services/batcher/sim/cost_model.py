"""Roofline cost model of one decode step, one prefill pass and KV copies on a GPU pair.

The simulator runs the real scheduling policies against these costs instead of a GPU, so the
model only has to rank policies correctly, not predict milliseconds. A step costs its HBM
traffic at the measured read rate plus its FLOPs at the measured matmul rate
(../shared/notes/gpu-facts.md), plus a fixed per-step floor: a decode step runs its
compute-bound projections and its memory-bound attention one after the other, so their
times add. On the H200 decode grid that sum gives 0.94-1.09x the measured CUDA-graph step
(Llama-3-8B, GQA; 0.95-1.00x on OPT-13B's MHA cells that fit in memory), where the larger of
the two at 80 % / 70 % of the ceilings gave 0.70-1.20x
(benchmarks/sim_grid_fit.py; a profile in benchmarks/step_profile.py: the GEMMs at M = 512
reach 97 % of the matmul rate and attention 88-96 % of the read rate, in turn). A prefill's
FLOPs count at `prefill_efficiency` of the matmul rate, its rate in serving. What separates
`aligned` from `fcfs` is how a mixed-length batch is charged; `padded` picks the two ends of
that range.
Pure Python + numpy; never torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from alignedserve.common.decode_graphs import graph_batch


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape: enough to count weight bytes, KV bytes and FLOPs.

    Norm weights and biases are left out (< 0.1 % of the parameters in both shapes below).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    # Llama: gate/up/down (3 matrices); OPT: fc1/fc2 (2 matrices).
    gated_mlp: bool = True
    # OPT reuses the input embedding as lm_head: stored once, but still multiplied each token.
    tied_embeddings: bool = False

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's projections (attention q/k/v/o + MLP)."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return attn + mlp

    @property
    def weight_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tied_embeddings else embed
        return self.num_layers * self.layer_matmul_params + embed + lm_head

    @property
    def weight_bytes(self) -> int:
        return self.weight_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: what one token adds to a request's cache."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def linear_flops_per_token(self) -> int:
        """2 FLOPs per multiply-add over every projection, lm_head included (tied or not)."""
        lm_head = self.vocab_size * self.hidden_size
        return 2 * (self.num_layers * self.layer_matmul_params + lm_head)

    @property
    def attention_flops_per_kv_token(self) -> int:
        """QK^T + PV for one query against one cached token, all layers (2 matmuls × 2 FLOPs)."""
        return 4 * self.num_heads * self.head_dim * self.num_layers

    def attention_flops(self, kv_len: int) -> int:
        """Attention FLOPs of one decoded token attending over kv_len cached tokens."""
        return self.attention_flops_per_kv_token * kv_len


LLAMA3_8B = ModelShape(
    name="llama3-8b",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)

# The paper's models are OPT; 13B is MHA, so its KV per token is 6.25× Llama-3-8B's.
OPT_13B = ModelShape(
    name="opt-13b",
    num_layers=40,
    hidden_size=5120,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    intermediate_size=20480,
    vocab_size=50272,
    gated_mlp=False,
    tied_embeddings=True,
)

SHAPES: dict[str, ModelShape] = {"llama3-8b": LLAMA3_8B, "opt-13b": OPT_13B}


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's ceilings. Defaults: H200 as measured in gpu-facts.md (2026-11-21)."""

    hbm_bytes: float = 141e9
    hbm_read_bytes_per_s: float = 4.23e12  # a 2 GiB sum
    matmul_flops_per_s: float = 790e12  # bf16 8192³ measured 798 TFLOP/s; rounded down
    pcie_h2d_bytes_per_s: float = 55.5e9  # pinned, per GPU; the two links are independent
    pcie_d2h_bytes_per_s: float = 55.4e9  # GPU→pinned host, per GPU
    nvlink_bytes_per_s: float = 396e9  # GPU1→GPU0 peer copy
    # The host's time between two steps: the served aligned runs' median gap between one
    # step's device work and the next, 0.25 ms (Llama-3-8B) and 0.30 ms (OPT-13B), thirty-
    # seventh session (benchmarks/sim_calibrate.py; it was a 30 us floor before).
    step_overhead_s: float = 0.28e-3
    # Prefill passes in serving reach this share of the matmul rate: host work, the varlen
    # attention and the KV copies around a pass (about 34k prompt tok/s on Llama-3-8B on an
    # H200 in the serving path, docs/benchmarks.md). Copies are already measured rates.
    prefill_efficiency: float = 0.7


@dataclass(frozen=True)
class StepCost:
    """A step's two terms, kept apart so the simulator can report which one dominated."""

    memory_s: float
    compute_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.memory_s + self.compute_s + self.overhead_s

    @property
    def compute_bound(self) -> bool:
        return self.compute_s > self.memory_s


_ZERO = StepCost(0.0, 0.0, 0.0)


def _lengths(kv_lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    # float64: sums of lengths × bytes stay exact far beyond any real batch, and never wrap.
    arr = np.asarray(kv_lengths, dtype=np.float64).reshape(-1)
    if arr.size and arr.min() < 0:
        raise ValueError("KV lengths must be >= 0")
    return arr


@dataclass(frozen=True)
class CostModel:
    """Costs of decode steps, prefill passes and copies for one model on one GPU kind.

    padded=True ("straggler"): a member of a decode batch costs as much as the longest one,
    as in padded or unsplit attention where the longest sequence sets each iteration's pace
    (the iteration bubble; gpu-facts.md: 64 requests, equal useful tokens, all 2048 vs half
    256 / half 3840 → 1.68× slower attention). padded=False ("balanced"): a perfectly
    load-balanced kernel, cost follows the sum of lengths. Aligned batches cost about the
    same under both, so the two settings bracket what mixing lengths costs `fcfs`.
    """

    model: ModelShape
    gpu: GpuSpec = field(default_factory=GpuSpec)
    padded: bool = True
    # The rows of the CUDA graph a pure decode step of n requests replays: the worker's sizes
    # (None: priced at its n rows, as before the thirty-seventh session).
    graph_rows: Callable[[int], int] | None = graph_batch

    def _mem_s(self, num_bytes: float) -> float:
        return num_bytes / self.gpu.hbm_read_bytes_per_s

    def _compute_s(self, flops: float, prefill_flops: float = 0.0) -> float:
        prefill_rate = self.gpu.matmul_flops_per_s * self.gpu.prefill_efficiency
        return flops / self.gpu.matmul_flops_per_s + prefill_flops / prefill_rate

    def step_cost(
        self,
        kv_lengths: Sequence[int] | np.ndarray,
        prefill_tokens: int = 0,
        prefill_context_tokens: int = 0,
    ) -> StepCost:
        """One iteration: decode one token for each member, plus an optional prefill chunk.

        The chunk's prefill_tokens attend causally to themselves and to
        prefill_context_tokens already cached (earlier chunks of the same prompt). Weights
        are read once for the whole step, which is why batching and chunking pay off.
        Writes of the new KV are left out: one token per member, and a 2k-token chunk of
        Llama-3-8B writes 0.27 GB against 16 GB of weights read.
        """
        lengths = _lengths(kv_lengths)
        if prefill_tokens < 0 or prefill_context_tokens < 0:
            raise ValueError("prefill token counts must be >= 0")
        batch = lengths.size
        if batch == 0 and prefill_tokens == 0:
            return _ZERO
        m = self.model
        # What each member's attention effectively covers: padded → the longest member's.
        attended = batch * float(lengths.max()) if self.padded and batch else float(lengths.sum())
        kv_read_bytes = attended * m.kv_bytes_per_token
        # A pure decode step runs as the worker runs it: a CUDA graph of the smallest batch
        # size that holds it, whose empty rows cost their projections' FLOPs and no KV.
        # Mixed steps run without a graph.
        rows = batch
        if self.graph_rows is not None and batch and not prefill_tokens:
            rows = self.graph_rows(batch)
        flops = rows * m.linear_flops_per_token + attended * m.attention_flops_per_kv_token
        prefill_flops = 0.0
        if prefill_tokens:
            kv_read_bytes += prefill_context_tokens * m.kv_bytes_per_token
            # Causal: token i attends to context + i + 1 keys; the mean is context + n/2.
            pairs = prefill_tokens * (prefill_context_tokens + prefill_tokens / 2)
            prefill_flops = prefill_tokens * m.linear_flops_per_token
            prefill_flops += pairs * m.attention_flops_per_kv_token
        return StepCost(
            memory_s=self._mem_s(m.weight_bytes + kv_read_bytes),
            compute_s=self._compute_s(flops, prefill_flops),
            overhead_s=self.gpu.step_overhead_s,
        )

    def decode_step_s(self, kv_lengths: Sequence[int] | np.ndarray) -> float:
        """One decode iteration of a batch whose members attend over these KV lengths."""
        return self.step_cost(kv_lengths).total_s

    def mixed_step_s(
        self,
        kv_lengths: Sequence[int] | np.ndarray,
        prefill_tokens: int,
        prefill_context_tokens: int = 0,
    ) -> float:
        """A continuous-batching step (fcfs with chunked prefill): decode + a prompt chunk."""
        return self.step_cost(kv_lengths, prefill_tokens, prefill_context_tokens).total_s

    def prefill_cost(
        self,
        prompt_lens: Sequence[int] | np.ndarray,
        cached_lens: Sequence[int] | np.ndarray | None = None,
    ) -> StepCost:
        """A prefill-only pass over prompt chunks, batched (the prefill device's job); each
        chunk attends to its `cached_lens` tokens before it (default: none, whole prompts)
        as well as to itself."""
        lens = _lengths(prompt_lens)
        tokens = float(lens.sum())
        if tokens == 0:
            return _ZERO
        cached = np.zeros_like(lens) if cached_lens is None else _lengths(cached_lens)
        m = self.model
        # causal: a chunk's token i attends to its cached tokens and i + 1 of its own
        pairs = float((lens * cached).sum()) + float((lens * lens).sum()) / 2
        flops = tokens * m.linear_flops_per_token + pairs * m.attention_flops_per_kv_token
        return StepCost(
            memory_s=self._mem_s(m.weight_bytes + float(cached.sum()) * m.kv_bytes_per_token),
            compute_s=self._compute_s(0.0, flops),
            overhead_s=self.gpu.step_overhead_s,
        )

    def prefill_s(
        self,
        prompt_lens: Sequence[int] | np.ndarray,
        cached_lens: Sequence[int] | np.ndarray | None = None,
    ) -> float:
        return self.prefill_cost(prompt_lens, cached_lens).total_s

    def h2d_s(self, num_bytes: float, links: int = 1) -> float:
        """Host→GPU copy over `links` independent PCIe links (1: one GPU, 2: both GPUs).

        gpu-facts.md measured 109.6 GB/s with both copying vs 55.5 GB/s alone: ~2×.
        """
        if links not in (1, 2):
            raise ValueError(f"links must be 1 or 2, got {links}")
        if num_bytes < 0:
            raise ValueError("num_bytes must be >= 0")
        return num_bytes / (self.gpu.pcie_h2d_bytes_per_s * links)

    def d2h_s(self, num_bytes: float) -> float:
        """GPU→host copy over that GPU's own link (a write-back into the pool)."""
        if num_bytes < 0:
            raise ValueError("num_bytes must be >= 0")
        return num_bytes / self.gpu.pcie_d2h_bytes_per_s

    def nvlink_s(self, num_bytes: float) -> float:
        """Prefetch GPU → decode GPU peer copy."""
        if num_bytes < 0:
            raise ValueError("num_bytes must be >= 0")
        return num_bytes / self.gpu.nvlink_bytes_per_s

    def kv_capacity_tokens(self, reserve_fraction: float = 0.1) -> int:
        """Tokens of KV that fit on the decode GPU beside the weights.

        reserve_fraction is kept back for activations, CUDA graphs and fragmentation.
        """
        if not 0.0 <= reserve_fraction < 1.0:
            raise ValueError("reserve_fraction must be in [0, 1)")
        free_bytes = self.gpu.hbm_bytes - self.model.weight_bytes
        return max(0, int(free_bytes * (1.0 - reserve_fraction) // self.model.kv_bytes_per_token))
