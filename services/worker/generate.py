"""A model runtime in one process: weights + KV cache + tokenizer, and the plain decode loop
(prefill everything, then decode until each request stops). It is the runtime's own
reference loop and the no-server demo; the batcher drives the same ModelRunner in serving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.model_config import ModelConfig
from alignedserve.common.sampling_params import SamplingParams, finish_reason
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.loader import load_model
from alignedserve.worker.runner import ModelRunner, SeqChunk


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    block_table: list[int] = field(default_factory=list)


class LocalRuntime:
    def __init__(self, config: ModelConfig, runner: ModelRunner, tokenizer: Tokenizer | None):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.allocator = BlockAllocator(runner.kv_cache.num_blocks)
        self.layout = runner.kv_cache.layout
        eos = set(config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = tuple(sorted(eos))

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        num_blocks: int = 1024,
        block_tokens: int = 16,
        load_tokenizer: bool = True,
        cuda_graphs: bool = False,
    ) -> LocalRuntime:
        config = ModelConfig.from_dir(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype)
        layout = KVLayout.for_model(config, block_tokens=block_tokens, dtype=dtype)
        cache = KVCache(layout, num_blocks, device=device, scratch_block=cuda_graphs)
        runner = ModelRunner(model, cache)
        tokenizer = Tokenizer.from_dir(model_dir) if load_tokenizer else None
        return cls(config, runner, tokenizer)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        max_len = self.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p or len(p) >= max_len:
                raise InvalidRequestError(
                    f"prompt {i} has {len(p)} tokens; need 1..{max_len - 1}", param="prompt"
                )
        gens = [Generation(list(p)) for p in prompts]
        active = list(range(len(gens)))
        try:
            while active:
                chunks = [self._next_chunk(i, gens[i], params[i]) for i in active]
                for i, tok in zip(active, self.runner.step(chunks), strict=True):
                    g = gens[i]
                    g.token_ids.append(tok.token_id)
                    g.logprobs.append(tok.logprob)
                    g.finish_reason = finish_reason(
                        params[i],
                        tok.token_id,
                        len(g.token_ids),
                        len(g.prompt_token_ids) + len(g.token_ids),
                        self.eos_token_ids,
                        max_len,
                    )
                active = [i for i in active if gens[i].finish_reason is None]
        finally:
            for g in gens:
                self.allocator.free(g.block_table)
                g.block_table = []
        return gens

    def _next_chunk(self, i: int, g: Generation, params: SamplingParams) -> SeqChunk:
        # First step: the whole prompt; after that the last sampled token.
        new = g.prompt_token_ids if not g.token_ids else g.token_ids[-1:]
        cached = 0 if not g.token_ids else len(g.prompt_token_ids) + len(g.token_ids) - 1
        need = self.layout.blocks_for(cached + len(new)) - len(g.block_table)
        g.block_table.extend(self.allocator.allocate(need))
        return SeqChunk(str(i), tuple(new), cached, tuple(g.block_table), params)
