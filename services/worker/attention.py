"""Attention over the block-format KV cache for a packed batch of requests.

One mechanism covers prefill, chunked prefill and decode: each request brings `q_len` new
tokens on top of `num_cached` tokens already in its blocks; the new K/V are written into the
blocks, then every new query attends causally over all of its request's keys. Decode is the
case q_len = 1.

`paged_attention_ref` is plain torch: the CPU path, and the reference the Triton kernels are
tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.transfer import to_device


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one forward pass, shared by all layers. N = total new tokens."""

    positions: torch.Tensor  # [N] position of each new token in its request
    slot_block: torch.Tensor  # [N] block holding that position
    slot_offset: torch.Tensor  # [N] offset inside the block
    q_batch: torch.Tensor  # [N] which request each new token belongs to
    q_index: torch.Tensor  # [N] its index among that request's new tokens
    block_tables: torch.Tensor  # [B, max_blocks] (padding points at block 0 and is masked)
    q_lens: torch.Tensor  # [B]
    ctx_lens: torch.Tensor  # [B] cached + new tokens
    last_token: torch.Tensor  # [B] packed index of each request's last new token
    max_q_len: int
    num_splits: int | None = None  # decode kernel's KV splits; fixed when a graph is captured
    host_q_lens: tuple[int, ...] = ()  # the same lengths on the host (prefill loops over them)
    host_ctx_lens: tuple[int, ...] = ()

    @classmethod
    def build(
        cls,
        q_lens: Sequence[int],
        num_cached: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_tokens: int,
        device: str | torch.device,
    ) -> AttentionMetadata:
        batch = len(q_lens)
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        cached_t = torch.tensor(num_cached, dtype=torch.long)
        q_batch = torch.repeat_interleave(torch.arange(batch), q_lens_t)
        starts = torch.cumsum(q_lens_t, 0) - q_lens_t  # packed offset of each request
        q_index = torch.arange(int(q_lens_t.sum())) - starts[q_batch]
        positions = cached_t[q_batch] + q_index
        table = padded_tables(block_tables, max(len(t) for t in block_tables), fill=0)
        slot_block = table[q_batch, positions // block_tokens]
        return cls(
            positions=to_device(positions, device),
            slot_block=to_device(slot_block, device),
            slot_offset=to_device(positions % block_tokens, device),
            q_batch=to_device(q_batch, device),
            q_index=to_device(q_index, device),
            block_tables=to_device(table, device),
            q_lens=to_device(q_lens_t, device),
            ctx_lens=to_device(cached_t + q_lens_t, device),
            last_token=to_device(starts + q_lens_t - 1, device),
            max_q_len=int(q_lens_t.max()),
            host_q_lens=tuple(q_lens),
            host_ctx_lens=tuple(c + q for c, q in zip(num_cached, q_lens, strict=True)),
        )


def padded_tables(block_tables: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    """[len(block_tables), width] int64 on the CPU: each table, then `fill`. Made in numpy,
    row by row: a tensor from nested Python lists costs ~40x more (6.5 ms for 256 x 512)."""
    table = np.full((len(block_tables), width), fill, dtype=np.int64)
    for i, t in enumerate(block_tables):
        table[i, : len(t)] = t
    return torch.from_numpy(table)


def attention_mask(
    meta: AttentionMetadata, num_keys: int, sliding_window: int | None
) -> torch.Tensor:
    """[B, 1, max_q_len, num_keys] bool: may query i of request b see key position s?"""
    device = meta.q_lens.device
    i = torch.arange(meta.max_q_len, device=device)[None, :]  # [1, Q]
    # Padding rows (i >= q_len) act as the last real query: their output is discarded, and
    # this keeps every row non-empty (an all-masked row would produce NaN).
    i = torch.minimum(i, meta.q_lens[:, None] - 1)  # [B, Q]
    q_pos = meta.ctx_lens[:, None] - meta.q_lens[:, None] + i  # [B, Q]
    s = torch.arange(num_keys, device=device)[None, None, :]  # [1, 1, S]
    mask = s <= q_pos[:, :, None]  # causal; implies s < ctx_len
    if sliding_window is not None:
        mask &= s > q_pos[:, :, None] - sliding_window
    return mask[:, None]


def attend_cached(
    q: torch.Tensor,  # [N, q_heads, head_dim], RoPE applied
    kv_cache: KVCache,  # the new tokens' K/V already written
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [N, q_heads, head_dim]
    """Each new query against its request's cached keys: a pure decode step on a GPU runs
    the Triton paged kernel (kernels/decode_attention.py), anything else the torch path."""
    k_blocks, v_blocks = kv_cache.layer(layer)
    if q.is_cuda and meta.max_q_len == 1:
        from alignedserve.worker.kernels.decode_attention import decode_attention

        return decode_attention(
            q,
            k_blocks,
            v_blocks,
            meta.block_tables,
            meta.ctx_lens,
            scale,
            sliding_window,
            num_splits=meta.num_splits,
        )
    if q.is_cuda and sliding_window is None and meta.host_q_lens:
        return attend_prefill(q, k_blocks, v_blocks, meta, scale)
    return _attend_ref(q, k_blocks, v_blocks, meta, scale, sliding_window)


def attend_prefill(
    q: torch.Tensor,  # [N, q_heads, head_dim] packed new tokens of all requests
    k_blocks: torch.Tensor,  # [num_blocks, T, kv_heads, D]
    v_blocks: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [N, q_heads, head_dim]
    """(Chunked) prefill, one request at a time, through torch's fused attention: the causal
    mask is aligned to the bottom right (a chunk's queries come after its cached keys), which
    the flash and memory-efficient kernels take without materialising a mask. No padding."""
    from torch.nn.attention.bias import causal_lower_right

    out = torch.empty_like(q)
    block_tokens = k_blocks.shape[1]
    start = 0
    for b, (q_len, ctx_len) in enumerate(zip(meta.host_q_lens, meta.host_ctx_lens, strict=True)):
        table = meta.block_tables[b, : -(-ctx_len // block_tokens)]
        keys = k_blocks[table].flatten(0, 1)[:ctx_len]  # [ctx, kv_heads, D]
        values = v_blocks[table].flatten(0, 1)[:ctx_len]
        q_b = q[start : start + q_len]  # [q_len, q_heads, D]
        out[start : start + q_len] = F.scaled_dot_product_attention(
            q_b.transpose(0, 1)[None],  # [1, Hq, q_len, D]
            keys.to(q.dtype).transpose(0, 1)[None],  # [1, Hk, ctx, D]
            values.to(q.dtype).transpose(0, 1)[None],
            attn_mask=causal_lower_right(q_len, ctx_len),
            scale=scale,
            enable_gqa=q.shape[1] != keys.shape[1],
        )[0].transpose(0, 1)
        start += q_len
    return out


def paged_attention_ref(
    q: torch.Tensor,  # [N, q_heads, head_dim]
    k: torch.Tensor,  # [N, kv_heads, head_dim] new keys (after RoPE)
    v: torch.Tensor,  # [N, kv_heads, head_dim]
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [N, q_heads, head_dim]
    kv_cache.write(layer, meta.slot_block, meta.slot_offset, k, v)
    k_blocks, v_blocks = kv_cache.layer(layer)  # [num_blocks, T, kv_heads, D]
    return _attend_ref(q, k_blocks, v_blocks, meta, scale, sliding_window)


def _attend_ref(
    q: torch.Tensor,  # [N, q_heads, head_dim]
    k_blocks: torch.Tensor,  # [num_blocks, T, kv_heads, D]
    v_blocks: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [N, q_heads, head_dim]
    batch, max_blocks = meta.block_tables.shape
    block_tokens, kv_heads, head_dim = k_blocks.shape[1:]
    num_keys = max_blocks * block_tokens
    # Gather each request's blocks into a padded [B, S, kv_heads, D] view of its context.
    keys = k_blocks[meta.block_tables].reshape(batch, num_keys, kv_heads, head_dim)
    values = v_blocks[meta.block_tables].reshape(batch, num_keys, kv_heads, head_dim)
    q_heads = q.shape[1]
    q_pad = q.new_zeros((batch, meta.max_q_len, q_heads, head_dim))
    q_pad[meta.q_batch, meta.q_index] = q
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # [B, Hq, Q, D]
        keys.to(q.dtype).transpose(1, 2),  # [B, Hk, S, D]
        values.to(q.dtype).transpose(1, 2),
        attn_mask=attention_mask(meta, num_keys, sliding_window),
        scale=scale,
        enable_gqa=q_heads != kv_heads,
    )  # [B, Hq, Q, D]
    return out.transpose(1, 2)[meta.q_batch, meta.q_index]
