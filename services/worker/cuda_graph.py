"""CUDA graphs for the decode step, one per batch size (`common/decode_graphs.py`).

A decode step launches ~20 kernels per layer; at small and medium batches their launch
and Python overhead, not the GPU, sets the pace. A captured graph replays them all with one
launch. Inputs live in static buffers that each replay overwrites, shared by a runner's
graphs (they never run at once): each graph reads the buffers' first rows. Rows beyond the
real batch point at a scratch block with a one-token context, so padding never touches a
real request's KV. The attention kernel reads context lengths from memory and plans its
split of the keys on the device, and reads no table entry past a request's blocks, so one
graph serves any contexts up to the tables' width (the model's longest context).
"""

from __future__ import annotations

import torch
from torch import nn

from alignedserve.worker.attention import AttentionMetadata
from alignedserve.worker.kv_cache import KVCache


class GraphInputs:
    """The static inputs of a runner's decode graphs: up to `max_batch` rows of tables
    `max_blocks` wide. Keeps padding rows padding, whichever graph wrote rows before."""

    def __init__(self, max_batch: int, max_blocks: int, scratch_block: int, device):
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.scratch_block = scratch_block
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)  # [B]
        self.block_tables = torch.full(
            (max_batch, max_blocks), scratch_block, dtype=torch.long, device=device
        )  # [B, max_blocks]
        self.ctx_lens = torch.ones(max_batch, dtype=torch.long, device=device)  # [B]
        self.rows = torch.arange(max_batch, device=device)
        self._filled = 0  # rows [filled:] hold padding (a 1-token context in the scratch block)
        self._wide = 0  # columns [wide:] of the filled rows hold the scratch block

    def write(
        self,
        input_ids: torch.Tensor,  # [n]
        block_tables: torch.Tensor,  # [n, w <= max_blocks]
        ctx_lens: torch.Tensor,  # [n]
    ) -> None:
        n, width = block_tables.shape
        if n > self.max_batch or width > self.max_blocks:
            raise ValueError(
                f"a decode step of {n} requests x {width} blocks exceeds its graphs' "
                f"{self.max_batch} x {self.max_blocks}"
            )
        self.input_ids[:n].copy_(input_ids)
        self.ctx_lens[:n].copy_(ctx_lens)
        self.block_tables[:n, :width].copy_(block_tables)
        if width < self._wide:  # a wider step's entries: unread, but kept scratch
            self.block_tables[:n, width : self._wide].fill_(self.scratch_block)
        if n < self._filled:  # the last step's rows past this one's: padding again
            self.block_tables[n : self._filled].fill_(self.scratch_block)
            self.ctx_lens[n : self._filled].fill_(1)
        self._filled, self._wide = n, width

    def reset(self) -> None:
        """Every row padding again: a graph captured while serving runs its capture's passes
        over these inputs, which must then touch the scratch block alone."""
        self.block_tables[: self._filled].fill_(self.scratch_block)
        self.ctx_lens[: self._filled].fill_(1)
        self._filled = self._wide = 0


class DecodeGraph:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        inputs: GraphInputs,  # shared with the runner's other graphs, which never run at once
        batch_size: int | None = None,  # the rows it reads: inputs.max_batch by default
        pool=None,  # a torch.cuda.graph_pool_handle() shared by those graphs
    ):
        self.model, self.kv_cache = model, kv_cache
        self.batch_size = inputs.max_batch if batch_size is None else batch_size
        self.block_tokens = kv_cache.layout.block_tokens
        dev = kv_cache.blocks.device
        if inputs.max_batch < self.batch_size:
            raise ValueError(f"graph inputs of {inputs.max_batch} rows for {self.batch_size}")
        self.inputs = inputs
        inputs.reset()
        b = self.batch_size
        # The rows this graph reads; positions and KV slots are derived inside the graph.
        self.input_ids = inputs.input_ids[:b]  # [B]
        self.block_tables = inputs.block_tables[:b]  # [B, max_blocks]
        self.ctx_lens = inputs.ctx_lens[:b]  # [B]
        self.rows = inputs.rows[:b]
        # Warm up on a side stream (Triton compiles, cuBLAS picks algorithms), then capture.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the prefill device's thread (worker/prefiller.py) may be running its
        # chunks meanwhile, and the pool may be page-locked on another (worker/pool_mapping.py);
        # their CUDA calls are not part of this capture and must not fail it.
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
        n = len(input_ids)
        assert n <= self.batch_size, (n, self.batch_size)
        self.inputs.write(input_ids, block_tables, ctx_lens)
        self.graph.replay()
        return self.logits[:n]
