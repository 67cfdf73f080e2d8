"""Execute one forward pass for a plan of request chunks: the scheduler<->model contract.

The caller (the batcher, or `generate` below the service layer) decides which requests run,
which tokens are new and which blocks hold their KV; the runner only computes. It keeps no
per-request state, so any request can move between batches and workers.

`launch` queues a pass and its sampling on the device and returns at once; the host waits
only in `LaunchedStep.result`. So the worker can queue step N+1 while step N runs, taking
step N's sampled tokens as inputs where they lie, on the device (`TokenCarry`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignedserve.common.decode_graphs import graph_batch, graph_batches
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.attention import AttentionMetadata, decode_first, padded_tables
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.sampler import sample
from alignedserve.worker.transfer import PinnedOutputs, tensor_on, to_device, to_host


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


@dataclass(frozen=True)
class TokenCarry:
    """New tokens not yet on the host: chunk `i`'s (single) token is `tokens[row]` for each
    (i, row) in `rows`, where `tokens` are a launched step's sampled tokens. The chunk's own
    token id is a placeholder."""

    tokens: torch.Tensor  # [M] on the runner's device
    rows: tuple[tuple[int, int], ...]  # (chunk index, row of `tokens`)


class LaunchedStep:
    """A forward pass and its sampling, queued on the device, with the store of its tokens
    into pinned host memory queued right behind: `result` waits for that only, not for the
    steps queued after this one."""

    def __init__(
        self,
        request_ids: list[str],  # of the sampled rows, in order
        tokens: torch.Tensor | None,  # [M] on the device
        logprobs: torch.Tensor | None,  # [M]
        timer: tuple | None,  # CUDA events around the device work; None: it is done
        host_s: float,
        outputs: PinnedOutputs,  # where the results land on the host (GPU)
    ):
        self.request_ids = request_ids
        self.tokens = tokens  # stays on the device: a later step may take them as inputs
        self.row = {request_id: i for i, request_id in enumerate(request_ids)}
        self._timer = timer
        self._host_s = host_s
        self._host = None
        self._outputs, self._buffer = outputs, None  # the pinned buffer it holds (GPU)
        self._result: list[SampledToken] | None = None
        if tokens is not None:
            if tokens.is_cuda:
                m = tokens.numel()
                at = m * tokens.element_size()  # logprobs after the tokens (8-byte aligned)
                end = at + m * logprobs.element_size()
                host, on_device = self._buffer = outputs.take(end)
                to_host(tokens, host[:at], on_device[:at])
                to_host(logprobs, host[at:end], on_device[at:end])
                host_tokens = host[:at].view(tokens.dtype)
                host_logprobs = host[at:end].view(logprobs.dtype)
                copied = torch.cuda.current_stream(tokens.device).record_event()
                self._host = (host_tokens, host_logprobs, copied)
            else:
                self._host = (tokens, logprobs, None)

    def result(self) -> list[SampledToken]:
        """The sampled tokens as host values; waits for them to reach the host."""
        if self._host is None:
            return []
        if self._result is None:
            tokens, logprobs, copied = self._host
            if copied is not None:
                copied.synchronize()
            self._result = [
                SampledToken(request_id, t, lp)
                for request_id, t, lp in zip(
                    self.request_ids, tokens.tolist(), logprobs.tolist(), strict=True
                )
            ]
            if self._buffer is not None:  # read: the buffer may take a later step's results
                self._outputs.give_back(self._buffer)
        return self._result

    def __del__(self) -> None:
        # dropped unread (a later launch of its run failed): the kernel storing its results
        # may still write into the pinned buffer, which torch hands out again once freed
        if self._buffer is not None and self._result is None and self._host is not None:
            with contextlib.suppress(RuntimeError):
                self._host[2].synchronize()

    @property
    def host_s(self) -> float:
        """The host's seconds to queue the pass and its sampling."""
        return self._host_s

    @property
    def compute_s(self) -> float:
        """The device's seconds for the pass and its sampling (once it is done); on the CPU,
        the launch's, which computed everything."""
        if self._timer is None:
            return self._host_s
        begin, end = self._timer
        end.synchronize()
        return begin.elapsed_time(end) / 1000


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.blocks.device
        self.block_tokens = kv_cache.layout.block_tokens
        # Decode steps replay CUDA graphs when the cache has a scratch block for their padding.
        self.use_graphs = self.device.type == "cuda" and kv_cache.scratch_block is not None
        self._graphs: dict[int, object] = {}  # batch size -> DecodeGraph
        self._graph_pool = None
        self._graph_inputs = None  # GraphInputs the graphs share, sized by the first captured
        # The graphs' tables are as wide as the longest context (the device's blocks at most).
        max_len = model.config.max_position_embeddings
        self.graph_width = min(kv_cache.num_blocks, -(-max_len // self.block_tokens))
        self.capture_s = 0.0  # spent capturing graphs (on first use of each bucket)
        # the steps' sampled tokens land there (GPU)
        self._outputs = PinnedOutputs(self.device if self.device.type == "cuda" else None)

    def on_device(self):
        """A context in which this thread's current CUDA device is the runner's: Triton
        launches its kernels on the current device, whatever device their tensors are on."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    @torch.inference_mode()
    def forward(
        self,
        chunks: Sequence[SeqChunk],
        all_logits: bool = False,
        carry: TokenCarry | None = None,
    ) -> torch.Tensor:
        """Logits [len(chunks), vocab] at each chunk's last new token (all tokens: [N, vocab]),
        in the chunks' order. A pure decode step replays a CUDA graph, unless a table is wider
        than the graphs' (`graph_width`, the longest context): that one runs eagerly. Other
        passes pack the chunks decode rows first (`attention.decode_first`)."""
        if self.use_graphs and not all_logits and all(len(c.token_ids) == 1 for c in chunks):
            width = max((len(c.block_table) for c in chunks), default=0)
            if width <= self.graph_width:
                return self._decode_with_graph(chunks, width, carry)
        order = decode_first([len(c.token_ids) for c in chunks])  # how the pass packs them
        packed = [chunks[i] for i in order]
        meta = AttentionMetadata.build(
            q_lens=[len(c.token_ids) for c in packed],
            num_cached=[c.num_cached_tokens for c in packed],
            block_tables=[c.block_table for c in packed],
            block_tokens=self.block_tokens,
            device=self.device,
        )
        input_ids = tensor_on([t for c in packed for t in c.token_ids], torch.long, self.device)
        first, at = [0] * len(chunks), 0  # each chunk's first token in the packed pass
        for i in order:
            first[i], at = at, at + len(chunks[i].token_ids)
        if carry is not None:
            self._take_carried(input_ids, carry, first)
        hidden = self.model(input_ids, meta.positions, meta, self.kv_cache)  # [N, hidden]
        # in the chunks' order: each one's last token, or all its tokens
        rows = [first[i] + len(c.token_ids) - 1 for i, c in enumerate(chunks)]
        if all_logits:
            rows = [first[i] + t for i, c in enumerate(chunks) for t in range(len(c.token_ids))]
        return self.model.logits(hidden[tensor_on(rows, torch.long, self.device)])

    def _take_carried(self, input_ids: torch.Tensor, carry: TokenCarry, starts: list[int]):
        """input_ids[starts[i]] = carry.tokens[row] for each (i, row): on the device."""
        at = tensor_on([starts[i] for i, _ in carry.rows], torch.long, self.device)
        rows = tensor_on([row for _, row in carry.rows], torch.long, self.device)
        input_ids[at] = carry.tokens[rows]

    def _decode_with_graph(
        self, chunks: Sequence[SeqChunk], width: int, carry: TokenCarry | None
    ) -> torch.Tensor:
        """A pure decode step through a captured graph: the batch is rounded up to a graph
        size (`common/decode_graphs.py`), each size captured on first use, all sharing one
        memory pool and one set of inputs (they never run at the same time)."""
        n = len(chunks)
        graph = self._graph(graph_batch(n))
        scratch = self.kv_cache.scratch_block
        tables = padded_tables([c.block_table for c in chunks], width, fill=scratch)
        dev = self.device
        ids = tensor_on([c.token_ids[0] for c in chunks], torch.long, dev)
        if carry is not None:
            self._take_carried(ids, carry, list(range(n)))
        ctx = tensor_on([c.num_cached_tokens + 1 for c in chunks], torch.long, dev)
        return graph.replay(ids, to_device(tables, dev), ctx)

    @torch.inference_mode()
    def launch(self, chunks: Sequence[SeqChunk], carry: TokenCarry | None = None) -> LaunchedStep:
        """Queue the chunks' forward pass and the sampling of one token for each chunk that
        asks for one; returns without waiting for the device (on the CPU: when it is done)."""
        start = time.perf_counter()
        timer = None
        if self.device.type == "cuda":
            timer = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timer[0].record()
        logits = self.forward(chunks, carry=carry)
        wanted = [i for i, c in enumerate(chunks) if c.sampling is not None]
        tokens = logprobs = None
        if len(wanted) < len(chunks):
            logits = logits[tensor_on(wanted, torch.long, self.device)]
        if wanted:
            tokens, logprobs = sample(
                logits,
                [chunks[i].sampling for i in wanted],
                [chunks[i].num_cached_tokens + len(chunks[i].token_ids) for i in wanted],
            )
        if timer is not None:
            timer[1].record()
        return LaunchedStep(
            [chunks[i].request_id for i in wanted],
            tokens,
            logprobs,
            timer,
            time.perf_counter() - start,
            self._outputs,
        )

    def step(self, chunks: Sequence[SeqChunk]) -> list[SampledToken]:
        """Run the chunks and sample one token for each chunk that asks for one."""
        return self.launch(chunks).result()

    def _graph(self, batch_size: int):
        """The decode graph of a batch size, captured on first use."""
        from alignedserve.worker.cuda_graph import DecodeGraph, GraphInputs

        graph = self._graphs.get(batch_size)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            inputs = self._graph_inputs
            if inputs is None or inputs.max_batch < batch_size:  # (graphs keep their own)
                inputs = self._graph_inputs = GraphInputs(
                    batch_size, self.graph_width, self.kv_cache.scratch_block, self.device
                )
            start = time.perf_counter()
            graph = DecodeGraph(self.model, self.kv_cache, inputs, batch_size, self._graph_pool)
            self.capture_s += time.perf_counter() - start
            self._graphs[batch_size] = graph
        return graph

    def warm_up(self, max_batch: int, max_model_len: int) -> int:
        """Before serving, on a GPU: compile the prefill pass's kernels, and capture every
        decode graph a step of up to `max_batch` requests of up to `max_model_len` tokens
        can use, so that no request waits for them (the first prefill in a process took
        2.6 s, a graph 30-200 ms). Scribbles on the first KV blocks: call it before any
        request holds one. Returns the graphs captured."""
        if self.device.type != "cuda":
            return 0
        block_tokens = self.block_tokens
        with self.on_device():
            # Triton specialises integer arguments on divisibility by 16: both kinds of
            # token count; the second pass continues the first's KV (a later chunk)
            n = min(256, max_model_len // 2) // 16 * 16
            table = tuple(range(-(-(n + 13) // block_tokens)))
            if n and len(table) <= self.kv_cache.num_blocks:
                greedy = SamplingParams(max_tokens=1, temperature=0.0)
                self.step([SeqChunk("warm-up", (0,) * n, 0, table, greedy)])
                self.step([SeqChunk("warm-up", (0,) * 13, n, table, greedy)])
            if self.use_graphs:
                for batch_size in graph_batches(max_batch):
                    self._graph(batch_size)
            # decode rows of mixed steps run the attention kernel outside any graph, for any
            # number of requests: its variants, compiled now
            from alignedserve.worker.kernels.decode_attention import warm_up as warm_up_attention

            config = self.model.config
            warm_up_attention(
                config.num_heads, *self.kv_cache.layer(0), max_batch, config.sliding_window
            )
            torch.cuda.synchronize(self.device)
        self.capture_s = 0.0  # counts captures while serving (the stats line's)
        return len(self._graphs)
