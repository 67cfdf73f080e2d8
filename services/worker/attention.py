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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from alignedserve.worker.kv_cache import KVCache, gather_rows_ref
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
    max_q_len: int
    # Prefill (max_q_len > 1): the keys of every request with more than one new token (P of
    # them), packed, as (block, offset) pairs, and the cumulative query / key counts a varlen
    # attention call takes.
    key_block: torch.Tensor | None = None  # [K] K = sum of those requests' ctx_lens
    key_offset: torch.Tensor | None = None  # [K]
    cu_q_lens: torch.Tensor | None = None  # [P + 1] int32
    cu_ctx_lens: torch.Tensor | None = None  # [P + 1] int32
    # Prefill of fresh prompts alone (nothing cached, no decode rows): the packed keys are
    # exactly the pass's new ones, in order, so attention may take those as they come
    # instead of gathering them back from the blocks they were just written to.
    keys_are_new: bool = False
    # A mixed step (prefill chunks beside decode rows) packs its decode rows first
    # (`decode_first`): the rows [0, num_decode_rows) go to the paged decode kernel, which
    # reads their blocks where they are, the rest to the varlen call, each a slice of q and
    # of the output (picking them out by index cost a mixed OPT-13B step 11 ms of 388).
    num_decode_rows: int = 0
    decode_tables: torch.Tensor | None = None  # [n, max_blocks] the decode rows' tables
    decode_ctx_lens: torch.Tensor | None = None  # [n]
    # The decode kernel's split of this pass's decode rows, by sliding window: made at the
    # first layer's call, read by every layer's (kernels/decode_plan.py).
    _decode_plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def decode_plan(self, q: torch.Tensor, k_blocks: torch.Tensor, sliding_window: int | None):
        """The pass's `DecodePlan` for its decode rows (every request of a decode pass, the
        requests of one new token in a mixed one), made once for all layers."""
        if sliding_window not in self._decode_plans:
            from alignedserve.worker.kernels.decode_plan import plan_decode

            tables, lens = self.block_tables, self.ctx_lens
            if self.decode_tables is not None:
                tables, lens = self.decode_tables, self.decode_ctx_lens
            plan = plan_decode(q, k_blocks, tables, lens, sliding_window)
            self._decode_plans[sliding_window] = plan
        return self._decode_plans[sliding_window]

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
        ctx_t = cached_t + q_lens_t
        max_q_len = int(q_lens_t.max())
        keys = {}
        if max_q_len > 1:
            is_decode = q_lens_t == 1
            decoding = int(is_decode.sum())
            if decoding and not bool(is_decode[:decoding].all()):
                raise ValueError(
                    "a mixed step packs its decode rows (requests of one new token) first, "
                    f"as attention.decode_first orders them; got q_lens {list(q_lens)[:16]}"
                )
            chunked = slice(decoding, batch)  # requests with a prompt chunk
            keys = _packed_keys(table[chunked], q_lens_t[chunked], ctx_t[chunked], block_tokens)
            keys["keys_are_new"] = not (decoding or cached_t.any())
            if decoding:
                keys.update(
                    num_decode_rows=decoding,
                    decode_tables=table[:decoding],
                    decode_ctx_lens=ctx_t[:decoding],
                )
            keys = {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in keys.items()}
        return cls(
            positions=to_device(positions, device),
            slot_block=to_device(slot_block, device),
            slot_offset=to_device(positions % block_tokens, device),
            q_batch=to_device(q_batch, device),
            q_index=to_device(q_index, device),
            block_tables=to_device(table, device),
            q_lens=to_device(q_lens_t, device),
            ctx_lens=to_device(ctx_t, device),
            max_q_len=max_q_len,
            **keys,
        )


def decode_first(q_lens: Sequence[int]) -> list[int]:
    """The order to pack a step's requests in: those of one new token (decode rows) first,
    each group in its given order, as `AttentionMetadata.build` wants a mixed step."""
    return [i for i, n in enumerate(q_lens) if n == 1] + [i for i, n in enumerate(q_lens) if n != 1]


def _packed_keys(
    table: torch.Tensor,  # [P, max_blocks]
    q_lens: torch.Tensor,  # [P]
    ctx_lens: torch.Tensor,  # [P]
    block_tokens: int,
) -> dict:
    """The varlen call's inputs for these requests, on the CPU: each one's keys as (block,
    offset) pairs, position by position, request by request, and the cumulative counts."""
    num_keys = int(ctx_lens.sum())
    k_batch = torch.repeat_interleave(torch.arange(len(ctx_lens)), ctx_lens, output_size=num_keys)
    k_pos = torch.arange(num_keys) - (torch.cumsum(ctx_lens, 0) - ctx_lens)[k_batch]
    zero = torch.zeros(1, dtype=torch.int32)
    return dict(
        key_block=table[k_batch, k_pos // block_tokens],
        key_offset=k_pos % block_tokens,
        cu_q_lens=torch.cat([zero, torch.cumsum(q_lens, 0).int()]),
        cu_ctx_lens=torch.cat([zero, torch.cumsum(ctx_lens, 0).int()]),
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
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # the pass's k, v (after RoPE)
) -> torch.Tensor:  # [N, q_heads, head_dim]
    """Each new query against its request's cached keys: a pure decode step on a GPU runs
    the Triton paged kernel (kernels/decode_attention.py), anything else the torch path."""
    k_blocks, v_blocks = kv_cache.layer(layer)
    if q.is_cuda and meta.max_q_len == 1:
        from alignedserve.worker.kernels.decode_attention import decode_attention

        plan = meta.decode_plan(q, k_blocks, sliding_window)
        return decode_attention(
            q, k_blocks, v_blocks, meta.block_tables, meta.ctx_lens, scale, sliding_window,
            plan=plan,
        )  # fmt: skip
    if q.is_cuda and sliding_window is None and meta.key_block is not None:
        return attend_prefill(q, k_blocks, v_blocks, meta, scale, new_kv)
    return _attend_ref(q, k_blocks, v_blocks, meta, scale, sliding_window)


def attend_prefill(
    q: torch.Tensor,  # [N, q_heads, head_dim] packed new tokens of all requests
    k_blocks: torch.Tensor,  # [num_blocks, T, kv_heads, D]
    v_blocks: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # the pass's k, v [N, Hk, D]
) -> torch.Tensor:  # [N, q_heads, head_dim]
    """(Chunked) prefill of the whole batch in one varlen attention call: every request's
    keys are gathered from its blocks into one packed tensor, then each query attends
    causally over its own request's keys, the mask aligned to the bottom right (a chunk's
    queries come after its cached keys). One call per layer, whatever the batch's shapes:
    a call per request cost the host ~70 % of a served prefill (docs/benchmarks.md).

    Fresh prompts alone (`meta.keys_are_new`) attend over `new_kv` as given when the cache
    holds q's dtype (the blocks then hold exactly those values): the gather was 4.5 % of the
    OPT-13B prefill device's time (docs/benchmarks.md, thirty-first session).

    In a mixed step the decode rows are not gathered: the paged decode kernel reads their
    blocks in place (gathering a long context to read it once more cost a mixed step more
    than its decode rows' whole attention)."""
    if meta.keys_are_new and new_kv is not None and k_blocks.dtype == q.dtype:
        return _attend_varlen(q, *new_kv, meta, scale)  # (no decode rows among them)
    gather = gather_rows_ref  # [K, kv_heads, D] each
    if q.is_cuda:  # one kernel, a key's row per program (kernels/kv_rows.py)
        from alignedserve.worker.kernels.kv_rows import gather_rows as gather
    keys, values = gather(k_blocks, v_blocks, meta.key_block, meta.key_offset, q.dtype)
    n = meta.num_decode_rows
    if not n:
        return _attend_varlen(q, keys, values, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out[:n] = _attend_decode(q[:n], k_blocks, v_blocks, meta, scale)
    _attend_varlen(q[n:], keys, values, meta, scale, out=out[n:])
    return out


def _attend_decode(q, k_blocks, v_blocks, meta: AttentionMetadata, scale) -> torch.Tensor:
    """A mixed step's decode rows, one query each over its blocks: the Triton kernel on a
    GPU (on the pass's plan), its twin else."""
    from alignedserve.worker.kernels.decode_attention import (
        decode_attention,
        decode_attention_ref,
    )

    tables, lens = meta.decode_tables, meta.decode_ctx_lens
    if not q.is_cuda:
        return decode_attention_ref(q, k_blocks, v_blocks, tables, lens, scale)
    plan = meta.decode_plan(q, k_blocks, None)
    return decode_attention(q, k_blocks, v_blocks, tables, lens, scale, plan=plan)


def _attend_varlen(
    q, keys, values, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The requests of meta.cu_q_lens, packed in q, in one varlen call over their keys and
    values packed as meta.cu_ctx_lens says ([K, kv_heads, D], the last dimension dense): the
    Triton kernel on a GPU (kernels/prefill_attention.py; q may be a strided split of the
    fused projection), its torch twin else. Into `out` ([N, Hq, D]) if given."""
    if q.is_cuda:
        from alignedserve.worker.kernels.prefill_attention import prefill_attention

        return prefill_attention(
            q, keys, values, meta.cu_q_lens, meta.cu_ctx_lens, meta.max_q_len, scale, out=out
        )
    got = varlen_attention_ref(q, keys, values, meta.cu_q_lens, meta.cu_ctx_lens, scale)
    return got if out is None else out.copy_(got)


def varlen_attention_ref(
    q: torch.Tensor,  # [N, q_heads, D] packed as cu_q_lens says
    keys: torch.Tensor,  # [K, kv_heads, D] packed as cu_ctx_lens says
    values: torch.Tensor,
    cu_q_lens: torch.Tensor,  # [B + 1]
    cu_ctx_lens: torch.Tensor,  # [B + 1]
    scale: float,
) -> torch.Tensor:  # [N, q_heads, D]
    """The varlen call in plain torch, a request at a time, with the bottom-right causal
    mask: float32 and the CPU, and the twin of kernels/prefill_attention.py."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dense even if q is strided
    q_starts, k_starts = cu_q_lens.tolist(), cu_ctx_lens.tolist()
    for b in range(len(q_starts) - 1):
        q_b = q[q_starts[b] : q_starts[b + 1]].transpose(0, 1)  # [Hq, q_len, D]
        k_b = keys[k_starts[b] : k_starts[b + 1]].transpose(0, 1)  # [Hk, ctx, D]
        v_b = values[k_starts[b] : k_starts[b + 1]].transpose(0, 1)
        q_len, ctx = q_b.shape[1], k_b.shape[1]
        i = torch.arange(q_len, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= i + (ctx - q_len)  # [q_len, ctx]
        out[q_starts[b] : q_starts[b + 1]] = F.scaled_dot_product_attention(
            q_b, k_b, v_b, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
        ).transpose(0, 1)
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
