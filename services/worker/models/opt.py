"""OPT decoder (the AlignedServe paper's models): MHA, learned positions offset by 2,
LayerNorm, ReLU MLP, pre-LN (post-LN for opt-350m), optional embedding projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignedserve.common.model_config import ModelConfig
from alignedserve.worker.attention import AttentionMetadata, attend_cached, paged_attention_ref
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.models.layers import Linear, embedding, fuse_linears

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, hidden, bias=bias)
        self.k_proj = Linear(hidden, hidden, bias=bias)
        self.v_proj = Linear(hidden, hidden, bias=bias)
        self.out_proj = Linear(hidden, hidden, bias=bias)

    def forward(self, x, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        n = x.shape[0]
        if hasattr(self, "qkv_proj"):  # fused on GPUs: one GEMM
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_heads, self.head_dim)
        v = v.view(n, self.num_heads, self.head_dim)
        scale = self.head_dim**-0.5
        if q.is_cuda:
            kv_cache.write(self.layer_idx, meta.slot_block, meta.slot_offset, k, v)
            out = attend_cached(q, kv_cache, self.layer_idx, meta, scale, new_kv=(k, v))
        else:
            out = paged_attention_ref(q, k, v, kv_cache, self.layer_idx, meta, scale)
        return self.out_proj(out.reshape(n, -1))

    def fuse_projections(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.pre_norm = config.do_layer_norm_before
        self.act = ACTIVATIONS[config.hidden_act]
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=config.norm_eps)
        self.fc1 = Linear(hidden, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = Linear(config.intermediate_size, hidden, bias=config.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=config.norm_eps)

    def forward(self, x, meta, kv_cache) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, meta, kv_cache)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        embed_dim = config.word_embed_proj_dim or hidden
        self.embed_tokens = embedding(config.vocab_size, embed_dim)
        self.embed_positions = embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        if config.word_embed_proj_dim:
            self.project_in = Linear(embed_dim, hidden, bias=False)
            self.project_out = Linear(hidden, embed_dim, bias=False)
        if config.final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(hidden, eps=config.norm_eps)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_layers))

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if hasattr(self, "project_in"):
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, meta, kv_cache)
        if hasattr(self, "final_layer_norm"):
            x = self.final_layer_norm(x)
        if hasattr(self, "project_out"):
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        embed_dim = config.word_embed_proj_dim or config.hidden_size
        self.lm_head = Linear(embed_dim, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta, kv_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
