"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm).

Module names equal Hugging Face's, so a checkpoint's tensors load by name. Activations are
packed: N = all new tokens of all requests in the step, no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignedserve.common.model_config import ModelConfig
from alignedserve.worker.attention import AttentionMetadata, attend_cached, paged_attention_ref
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.models.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    add_rms_norm,
    embedding,
    fuse_linears,
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        hidden, q_dim = config.hidden_size, config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = Linear(hidden, q_dim, bias=config.attention_bias)
        self.k_proj = Linear(hidden, kv_dim, bias=config.attention_bias)
        self.v_proj = Linear(hidden, kv_dim, bias=config.attention_bias)
        self.o_proj = Linear(q_dim, hidden, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        positions: torch.Tensor,  # [N]
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        n = x.shape[0]
        if hasattr(self, "qkv_proj"):  # fused on GPUs: one GEMM
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        scale = self.head_dim**-0.5
        if q.is_cuda:  # one kernel rotates q and k and appends k, v to the cache
            from alignedserve.worker.kernels.fused import rope_kv_write

            k_blocks, v_blocks = kv_cache.layer(self.layer_idx)
            cos_sin = rotary.cos_sin_cache(q.device)
            q, _ = rope_kv_write(
                q, k, v, positions, cos_sin, k_blocks, v_blocks, meta.slot_block, meta.slot_offset
            )
            out = attend_cached(q, kv_cache, self.layer_idx, meta, scale, self.sliding_window)
        else:
            q, k = rotary(positions, q, k)
            out = paged_attention_ref(
                q, k, v, kv_cache, self.layer_idx, meta, scale, self.sliding_window
            )  # [N, heads, head_dim]
        return self.o_proj(out.reshape(n, -1))

    def fuse_projections(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # fused on GPUs: one GEMM, one activation kernel
            from alignedserve.worker.kernels.fused import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse_projections(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x, residual, positions, rotary, meta, kv_cache):
        """x: what the previous layer adds to the residual stream (the embeddings for the
        first layer, whose residual is None). Returns this layer's addition and the stream."""
        h, residual = add_rms_norm(self.input_layernorm, x, residual)
        h = self.self_attn(h, positions, rotary, meta, kv_cache)
        h, residual = add_rms_norm(self.post_attention_layernorm, h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [N, hidden]
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, meta, kv_cache)
        return add_rms_norm(self.norm, x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:  # [N, hidden]
        return self.model(input_ids, positions, meta, kv_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, hidden] -> [M, vocab]
        return self.lm_head(hidden)
