"""Turn the last-position logits of a batch into one token per request.

Randomness is counter-based: the noise for a request's token at position p comes from a
generator seeded with (seed, p). The runner keeps no per-request state, so a request moved
to another batch or another worker (after a crash) samples exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.transfer import tensor_on

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, position) pairs


def _row_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position) % (2**63)


def sample(
    logits: torch.Tensor,  # [M, vocab]
    params: Sequence[SamplingParams],
    positions: Sequence[int],  # position of the token being sampled, per row
) -> tuple[torch.Tensor, torch.Tensor]:  # token ids [M], logprob of each under the model [M]
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # the model's, before any logit_bias
    logits = _biased(logits, params)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        idx = tensor_on(rows, torch.long, logits.device)
        probs = _filtered_probs(logits[idx], [params[i] for i in rows])
        # Exponential race (equivalent to Gumbel-max): argmax p_i / E_i draws i with prob p_i.
        noise = torch.empty_like(probs).exponential_()  # unseeded rows: one draw for all
        for j, i in enumerate(rows):
            seed = params[i].seed
            if seed is not None:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(_row_seed(seed, positions[i]))
                noise[j].exponential_(generator=gen)
        tokens[idx] = (probs / noise).argmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen


def _biased(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The rows' logit_bias added (a new tensor; the same one when no row has a bias). Ids
    past the vocabulary are left out (the router refuses them)."""
    vocab = logits.shape[-1]
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if t < vocab]
    if not entries:
        return logits
    rows, ids, values = zip(*entries, strict=True)
    device = logits.device
    index = (tensor_on(rows, torch.long, device), tensor_on(ids, torch.long, device))
    return logits.index_put(index, tensor_on(values, torch.float32, device), accumulate=True)


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then min-p, then top-k, then top-p (nucleus): temperature first, as vLLM
    and transformers do."""
    device = logits.device
    # every host value goes through tensor_on: the host must not wait for the device here
    temps = tensor_on([p.temperature for p in params], torch.float32, device)
    logits = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = tensor_on([p.min_p for p in params], torch.float32, device)
        probs = logits.softmax(dim=-1)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_k = tensor_on(top_k, torch.long, device)
    top_p = tensor_on([p.top_p for p in params], torch.float32, device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the more likely tokens before it already cover top_p; keep the first.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill((before >= top_p[:, None]) & (ranks > 0), -torch.inf)
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return filtered.softmax(dim=-1)
