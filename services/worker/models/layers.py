"""Building blocks shared by the model families."""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from alignedserve.common.model_config import RopeConfig


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table without random init: every weight comes from the checkpoint (or
    init_tiny), and random init on the meta device would pull in torch._dynamo (~1 s)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


@functools.cache
def skinny_kernels() -> ModuleType:
    """kernels/skinny_linear, imported once, on first use: it pulls in Triton, which the
    CPU's paths never need. Its settings (MAX_TOKENS, FUSED_OPS) are read from it per call."""
    from alignedserve.worker.kernels import skinny_linear

    return skinny_linear


def takes_skinny(x: torch.Tensor) -> bool:  # x: [M, in]
    """Whether a projection of x takes the skinny Triton GEMM (kernels/skinny_linear.py,
    faster than cuBLAS for a handful of tokens): CUDA rows of at most MAX_TOKENS."""
    if not (x.is_cuda and x.dim() == 2 and x.stride(-1) == 1):
        return False
    return x.shape[0] <= skinny_kernels().MAX_TOKENS


class Linear(nn.Linear):
    """nn.Linear whose CUDA forward takes the skinny Triton GEMM for a handful of tokens,
    nn.Linear's otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        if takes_skinny(x):
            return skinny_kernels().skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def fuse_linears(*linears: nn.Linear) -> Linear:
    """One Linear computing the given ones side by side (outputs concatenated): one GEMM
    instead of several. Used on GPUs after loading; the checkpoint keeps its own names."""
    first = linears[0]
    fused = Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    fused.requires_grad_(False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


def fold_norm_weight(norm: RMSNorm, linear: nn.Linear) -> None:
    """Move RMSNorm's weight into the columns of the projection it feeds, and make the norm's
    weight 1: (g * x̂) @ W.T == x̂ @ (W * g).T, so every path (separate kernels or the skinny
    GEMM's prologue, kernels/skinny_linear.py) computes the same layer with no per-element
    multiply by g. Rounded once, in fp32, to the weight's dtype. GPU only, after fusing
    (the CPU's weights are views of the memory-mapped checkpoint)."""
    with torch.no_grad():
        gain = norm.weight.float()[None, :]  # [1, in]
        linear.weight.copy_((linear.weight.float() * gain).to(linear.weight.dtype))
        norm.weight.fill_(1.0)


def add_rms_norm(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the residual stream and the next layer's input.
    One fused kernel on a GPU; the same arithmetic in torch elsewhere."""
    if x.is_cuda:
        from alignedserve.worker.kernels.fused import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    summed = x if residual is None else x + residual
    return norm(summed), summed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the Llama/Qwen reference numerics.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, with linear or llama3-style scaling (on the CPU:
    under a meta-device build, meta maths would pull in torch._dynamo, ~1.4 s)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1's context extension).
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin made per step from positions, so no length cap."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int = 8192):
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)
        self._cos_sin: torch.Tensor | None = None

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """[max_positions, head_dim] fp32 cos | sin table for the fused GPU kernel; built on
        first use (before any CUDA graph is captured: capture runs a warm-up step first)."""
        if self._cos_sin is None or self._cos_sin.device != device:
            from alignedserve.worker.kernels.fused import build_cos_sin_cache

            self._cos_sin = build_cos_sin_cache(self.inv_freq.to(device), self.max_positions)
        return self._cos_sin

    def materialize_buffers(self, device: str | torch.device) -> None:
        """Recompute the (non-checkpoint) buffer after the model was built on the meta device."""
        self.inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)

    def forward(
        self,
        positions: torch.Tensor,  # [N]
        q: torch.Tensor,  # [N, q_heads, D]
        k: torch.Tensor,  # [N, kv_heads, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
