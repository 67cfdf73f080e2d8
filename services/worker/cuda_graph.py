"""CUDA graphs for the decode step, one per (batch bucket, block-table width).

A decode step launches ~20 kernels per layer; at small and medium batches their launch
and Python overhead, not the GPU, sets the pace. A captured graph replays them all with one
launch. Inputs live in static buffers that each replay overwrites. Rows beyond the real
batch point at a scratch block with a one-token context, so padding never touches a real
request's KV. The attention kernel reads context lengths from memory and plans its split of
the keys on the device, so one graph serves any contexts up to the table width.
"""

from __future__ import annotations

import torch
from torch import nn

from alignedserve.worker.attention import AttentionMetadata
from alignedserve.worker.kv_cache import KVCache


class DecodeGraph:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        batch_size: int,
        max_blocks: int,
        scratch_block: int,
        pool=None,  # a torch.cuda.graph_pool_handle() shared by graphs that never run at once
    ):
        self.model, self.kv_cache = model, kv_cache
        self.batch_size, self.max_blocks = batch_size, max_blocks
        self.scratch_block = scratch_block
        self.block_tokens = kv_cache.layout.block_tokens
        dev = kv_cache.blocks.device
        b = batch_size
        # The inputs a replay writes; positions and KV slots are derived inside the graph.
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)  # [B]
        self.block_tables = torch.full(
            (b, max_blocks), scratch_block, dtype=torch.long, device=dev
        )  # [B, max_blocks]
        self.ctx_lens = torch.ones(b, dtype=torch.long, device=dev)  # [B]
        self.rows = torch.arange(b, device=dev)
        self.filled = b  # rows [filled:] hold padding (a 1-token context in the scratch block)
        # Warm up on a side stream (Triton compiles, cuBLAS picks algorithms), then capture.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the prefill device's thread (worker/prefiller.py) may be running its
        # chunks meanwhile; its CUDA calls are not part of this capture and must not fail it.
        # stream: torch's default capture stream is made once per process, on the device
        # current then; a graph of another device must be captured on a stream of its own.
        capture = torch.cuda.graph(
            self.graph, pool=pool, stream=side, capture_error_mode="thread_local"
        )
        with capture, torch.inference_mode():
            self.logits = self._forward()  # [B, vocab], rewritten by every replay

    def _forward(self) -> torch.Tensor:
        positions = self.ctx_lens - 1  # [B] the new token's position
        meta = AttentionMetadata(
            positions=positions,
            slot_block=self.block_tables[self.rows, positions // self.block_tokens],
            slot_offset=positions % self.block_tokens,
            q_batch=self.rows,
            q_index=torch.zeros_like(self.rows),
            block_tables=self.block_tables,
            q_lens=torch.ones_like(self.rows),
            ctx_lens=self.ctx_lens,
            last_token=self.rows,
            max_q_len=1,
        )
        hidden = self.model(self.input_ids, positions, meta, self.kv_cache)
        return self.model.logits(hidden)

    @torch.inference_mode()
    def replay(
        self,
        input_ids: torch.Tensor,  # [n] the token each request decodes now
        block_tables: torch.Tensor,  # [n, w <= max_blocks] device block ids
        ctx_lens: torch.Tensor,  # [n] KV length including this token
    ) -> torch.Tensor:  # [n, vocab] logits
        n, width = block_tables.shape
        assert n <= self.batch_size and width <= self.max_blocks, (n, width)
        self.input_ids[:n].copy_(input_ids)
        self.ctx_lens[:n].copy_(ctx_lens)
        self.block_tables[:n, :width].copy_(block_tables)
        if width < self.max_blocks:
            self.block_tables[:n, width:].fill_(self.scratch_block)
        if n != self.filled:  # padding rows: a one-token context in the scratch block
            self.block_tables[n:].fill_(self.scratch_block)
            self.ctx_lens[n:].fill_(1)
            self.filled = n
        self.graph.replay()
        return self.logits[:n]
