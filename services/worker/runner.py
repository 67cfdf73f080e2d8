"""Execute one forward pass for a plan of request chunks: the scheduler<->model contract.

The caller (the batcher, or `generate` below the service layer) decides which requests run,
which tokens are new and which blocks hold their KV; the runner only computes. It keeps no
per-request state, so any request can move between batches and workers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.attention import AttentionMetadata, padded_tables
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.sampler import sample


@dataclass(frozen=True)
class SeqChunk:
    """One request's share of a forward pass."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens: a prompt (chunk) or the last sampled token
    num_cached_tokens: int  # tokens of this request already in its KV blocks
    block_table: tuple[int, ...]  # blocks covering num_cached_tokens + len(token_ids)
    sampling: SamplingParams | None  # None: produce no token (a non-final prefill chunk)


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: float  # log-probability under the model's (unprocessed) distribution


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.blocks.device
        self.block_tokens = kv_cache.layout.block_tokens
        # Decode steps replay CUDA graphs when the cache has a scratch block for their padding.
        self.use_graphs = self.device.type == "cuda" and kv_cache.scratch_block is not None
        self._graphs: dict[tuple[int, int], object] = {}  # (batch bucket, width bucket)
        self._graph_pool = None
        self.capture_s = 0.0  # spent capturing graphs (on first use of each bucket)

    def on_device(self):
        """A context in which this thread's current CUDA device is the runner's: Triton
        launches its kernels on the current device, whatever device their tensors are on."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [len(chunks), vocab] at each chunk's last new token (all tokens: [N, vocab])."""
        if self.use_graphs and not all_logits and all(len(c.token_ids) == 1 for c in chunks):
            return self._decode_with_graph(chunks)
        meta = AttentionMetadata.build(
            q_lens=[len(c.token_ids) for c in chunks],
            num_cached=[c.num_cached_tokens for c in chunks],
            block_tables=[c.block_table for c in chunks],
            block_tokens=self.block_tokens,
            device=self.device,
        )
        input_ids = torch.tensor(
            [t for c in chunks for t in c.token_ids], dtype=torch.long, device=self.device
        )
        hidden = self.model(input_ids, meta.positions, meta, self.kv_cache)  # [N, hidden]
        return self.model.logits(hidden if all_logits else hidden[meta.last_token])

    def _decode_with_graph(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """A pure decode step through a captured graph: batch and block-table width are
        rounded up to powers of two, each (batch, width) bucket captured on first use, all
        sharing one memory pool (they never run at the same time)."""
        from alignedserve.worker.cuda_graph import DecodeGraph

        n = len(chunks)
        width = max(len(c.block_table) for c in chunks)
        key = (_bucket(n), _bucket(max(width, 16)))
        graph = self._graphs.get(key)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            start = time.perf_counter()
            graph = DecodeGraph(
                self.model, self.kv_cache, *key, self.kv_cache.scratch_block, pool=self._graph_pool
            )
            self.capture_s += time.perf_counter() - start
            self._graphs[key] = graph
        scratch = self.kv_cache.scratch_block
        tables = padded_tables([c.block_table for c in chunks], width, fill=scratch)
        ids = torch.tensor([c.token_ids[0] for c in chunks], dtype=torch.long)
        ctx = torch.tensor([c.num_cached_tokens + 1 for c in chunks], dtype=torch.long)
        dev = self.device
        return graph.replay(
            ids.to(dev, non_blocking=True),
            tables.to(dev, non_blocking=True),
            ctx.to(dev, non_blocking=True),
        )

    def step(self, chunks: Sequence[SeqChunk]) -> list[SampledToken]:
        """Run the chunks and sample one token for each chunk that asks for one."""
        logits = self.forward(chunks)
        wanted = [i for i, c in enumerate(chunks) if c.sampling is not None]
        if not wanted:
            return []
        tokens, logprobs = sample(
            logits[wanted],
            [chunks[i].sampling for i in wanted],
            [chunks[i].num_cached_tokens + len(chunks[i].token_ids) for i in wanted],
        )
        return [
            SampledToken(chunks[i].request_id, int(t), float(lp))
            for i, t, lp in zip(wanted, tokens.tolist(), logprobs.tolist(), strict=True)
        ]


def _bucket(n: int) -> int:
    """The next power of two >= n."""
    return 1 << (n - 1).bit_length()
