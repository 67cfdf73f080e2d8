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
    fold_norm_weight,
    fuse_linears,
    skinny_kernels,
    takes_skinny,
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
    ) -> torch.Tensor:  # [N, hidden]
        if hasattr(self, "qkv_proj"):  # fused on GPUs: one GEMM
            q, k, v = self.split_qkv(self.qkv_proj(x))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, positions, rotary, meta, kv_cache))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:  # views of [N, ...]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_dim, kv_dim, kv_dim], dim=-1)

    def attend(
        self,
        q: torch.Tensor,  # [N, heads * head_dim]
        k: torch.Tensor,  # [N, kv_heads * head_dim]
        v: torch.Tensor,  # [N, kv_heads * head_dim]
        positions: torch.Tensor,  # [N]
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:  # [N, heads * head_dim]
        """RoPE, the KV append and attention over the cache, from the projected q, k, v."""
        n = q.shape[0]
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
            q, k = rope_kv_write(
                q, k, v, positions, cos_sin, k_blocks, v_blocks, meta.slot_block, meta.slot_offset
            )
            out = attend_cached(
                q, kv_cache, self.layer_idx, meta, scale, self.sliding_window, new_kv=(k, v)
            )
        else:
            q, k = rotary(positions, q, k)
            out = paged_attention_ref(
                q, k, v, kv_cache, self.layer_idx, meta, scale, self.sliding_window
            )  # [N, heads, head_dim]
        return out.reshape(n, -1)

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
        self.norms_folded = False  # fold_norm_weights: what the fused small step needs

    def forward(self, x, residual, positions, rotary, meta, kv_cache):
        """x: what the previous layer adds to the residual stream (the embeddings for the
        first layer, whose residual is None). Returns this layer's addition and the stream;
        the fused small step returns the stream itself and None."""
        if self.norms_folded and takes_skinny(x) and skinny_kernels().FUSED_OPS:
            return self.skinny_forward(x, residual, positions, rotary, meta, kv_cache)
        h, residual = add_rms_norm(self.input_layernorm, x, residual)
        h = self.self_attn(h, positions, rotary, meta, kv_cache)
        h, residual = add_rms_norm(self.post_attention_layernorm, h, residual)
        return self.mlp(h), residual

    def skinny_forward(self, x, residual, positions, rotary, meta, kv_cache):
        """The same layer in four GEMMs that carry its small ops (kernels/skinny_linear.py):
        RMSNorm in the qkv and gate_up GEMMs, SiLU * up in gate_up's, the residual adds in
        o's and down's. For a handful of tokens, where each kernel's launch, ramp and tail
        cost about as much as its work."""
        skl, attn, mlp = skinny_kernels(), self.self_attn, self.mlp
        stream = x if residual is None else x + residual  # [N, hidden]
        qkv = skl.normed_linear(
            stream, self.input_layernorm.eps, attn.qkv_proj.weight, attn.qkv_proj.bias
        )  # [N, (heads + 2 kv_heads) * head_dim]
        out = attn.attend(*attn.split_qkv(qkv), positions, rotary, meta, kv_cache)
        stream = skl.linear_residual(out, attn.o_proj.weight, stream, attn.o_proj.bias)
        act = skl.normed_linear(
            stream, self.post_attention_layernorm.eps,
            mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, silu_mul=True,
        )  # fmt: skip  # [N, intermediate]
        return skl.linear_residual(act, mlp.down_proj.weight, stream, mlp.down_proj.bias), None

    def fold_norm_weights(self) -> None:
        """After fuse_projections: each norm's weight into the fused GEMM it feeds."""
        fold_norm_weight(self.input_layernorm, self.self_attn.qkv_proj)
        fold_norm_weight(self.post_attention_layernorm, self.mlp.gate_up_proj)
        self.norms_folded = True


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
