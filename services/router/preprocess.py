"""A validated request body -> what the batcher is asked to do: one generation per choice
(each prompt of a batch, n samples of each), with its prompt token ids, sampling parameters
and stop strings. Every refusal is an InvalidRequestError naming the field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.router.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
)


@dataclass(frozen=True)
class Limits:
    max_model_len: int  # context length, tokens
    vocab_size: int  # token ids must be below it
    default_max_tokens: int  # for requests that set no max_tokens


@dataclass(frozen=True)
class GenerationInput:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...]  # stop strings, matched by the router on the text


# Choices one request may ask for (prompts x n): each is a request of its own to a batcher,
# and a request's choices are admitted together or not at all.
MAX_CHOICES = 256
SEED_RANGE = 2**63  # SamplingParams' seeds: sample j of a prompt takes seed + j, wrapped


@dataclass(frozen=True)
class Generations:
    """One API request's generations: a choice per (prompt, sample), numbered prompt-major as
    OpenAI numbers them. They share the request's stream options."""

    inputs: tuple[GenerationInput, ...]
    num_prompt_tokens: int  # usage: each prompt counted once, however many samples it has
    stream: bool
    include_usage: bool  # streaming: a last chunk with usage and no choices
    continuous_usage: bool  # streaming: and every chunk with the usage so far

    @property
    def first(self) -> GenerationInput:
        return self.inputs[0]


# field -> (values that change nothing, so that ignoring the feature is exact; what we support)
_SHARED_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "presence_penalty": ((None, 0), "no penalties"),
    "frequency_penalty": ((None, 0), "no penalties"),
    "repetition_penalty": ((None, 1), "no penalties"),
    "min_tokens": ((None, 0), "no min_tokens"),
}
_COMPLETION_UNSUPPORTED = {
    "echo": ((None, False), "no echo"),
    "best_of": ((None, 1), "only best_of=1"),
    "suffix": ((None, ""), "no suffix"),
}
_CHAT_UNSUPPORTED = {
    "top_logprobs": ((None, 0), "only the sampled token's logprob: top_logprobs must be 0"),
    "tools": ((None, []), "no tools"),
    "response_format": ((None, {"type": "text"}), "only text responses"),
}


def completion_inputs(
    req: CompletionRequest, tokenizer: Tokenizer, limits: Limits, request_id: str
) -> Generations:
    _refuse_unsupported(req, {**_SHARED_UNSUPPORTED, **_COMPLETION_UNSUPPORTED})
    if req.logprobs is not None and not 0 <= req.logprobs <= 1:
        raise InvalidRequestError(
            f"logprobs={req.logprobs} is not supported: 0 or 1 (the sampled token's logprob)",
            param="logprobs",
        )
    if not req.prompt:
        raise InvalidRequestError("prompt is empty", param="prompt")
    single = isinstance(req.prompt, str) or isinstance(req.prompt[0], int)
    batch = [req.prompt] if single else req.prompt  # a list of strings or of id lists
    prompts = []
    for i, prompt in enumerate(batch):
        param = "prompt" if single else f"prompt[{i}]"
        if not prompt:
            raise InvalidRequestError(f"{param} is empty", param=param)
        if isinstance(prompt, str):
            prompts.append((param, tokenizer.encode(prompt)))
        else:
            _check_token_ids(prompt, limits, param)
            prompts.append((param, prompt))
    return _generations(req, request_id, prompts, "max_tokens", req.max_tokens,
                        req.logprobs is not None, limits)  # fmt: skip


def chat_inputs(
    req: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits, request_id: str
) -> Generations:
    _refuse_unsupported(req, {**_SHARED_UNSUPPORTED, **_CHAT_UNSUPPORTED})
    # The rendered template starts with its own BOS: encode without adding another.
    text = tokenizer.apply_chat_template([_message(m) for m in req.messages])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    max_param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
    return _generations(req, request_id, [("messages", prompt_ids)], max_param,
                        getattr(req, max_param), bool(req.logprobs), limits)  # fmt: skip


def _generations(
    req: GenerationRequest,
    request_id: str,
    prompts: list[tuple[str, Sequence[int]]],  # (the field that carried it, token ids)
    max_param: str,
    num_max: int | None,
    logprobs: bool,
    limits: Limits,
) -> Generations:
    """n samples of each prompt. Sample j of a prompt takes the request's seed + j, so that a
    seeded request's choices differ from each other and repeat exactly. What the request's
    choices share (stop strings, sampling settings, stream options) is read once."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise InvalidRequestError(f"n={n} must be >= 1", param="n")
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequestError(
            f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} choices: at most "
            f"{MAX_CHOICES} in one request",
            param="n" if n > 1 else "prompt",
        )
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    lengths = [_max_tokens(ids, param, max_param, num_max, limits) for param, ids in prompts]
    stop_ids = req.stop_token_ids or []
    _check_token_ids(stop_ids, limits, "stop_token_ids")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if "" in stop:
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    shared = dict(
        min_p=0.0 if req.min_p is None else req.min_p,
        logit_bias=_logit_bias(req.logit_bias, limits),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
    )
    inputs = []
    for (_, prompt_ids), (max_tokens, is_default) in zip(prompts, lengths, strict=True):
        for j in range(n):
            # sample 0 takes the seed as sent, so an out-of-range one is refused by name
            seed = req.seed if req.seed is None or j == 0 else (req.seed + j) % SEED_RANGE
            params = SamplingParams(max_tokens=max_tokens, is_default_max_tokens=is_default,
                                    seed=seed, **shared)  # fmt: skip
            inputs.append(GenerationInput(request_id, tuple(prompt_ids), params, stop))
    if len(inputs) > 1:  # each choice is a batcher request of its own
        inputs = [replace(g, request_id=f"{request_id}-{k}") for k, g in enumerate(inputs)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Generations(
        inputs=tuple(inputs),
        num_prompt_tokens=sum(len(ids) for _, ids in prompts),
        stream=bool(req.stream),
        include_usage=include_usage,
        continuous_usage=include_usage and bool(req.stream_options.continuous_usage_stats),
    )


def _max_tokens(
    prompt_ids: Sequence[int],
    prompt_param: str,  # the field that carried the prompt
    max_param: str,  # the field that carried num_max
    num_max: int | None,
    limits: Limits,
) -> tuple[int, bool]:
    """The prompt's max_tokens, checked against the context, and whether the router filled
    it in."""
    n, context = len(prompt_ids), limits.max_model_len
    if n >= context:
        raise InvalidRequestError(
            f"this model's context length is {context} tokens, and the prompt alone is {n} "
            f"tokens: at most {context - 1} leave room for one generated token",
            param=prompt_param,
        )
    if num_max is None:
        return min(context - n, limits.default_max_tokens), True
    if num_max < 1:
        raise InvalidRequestError(f"{max_param}={num_max} must be >= 1", param=max_param)
    if n + num_max > context:
        raise InvalidRequestError(
            f"this model's context length is {context} tokens, but {n} prompt tokens plus "
            f"{max_param}={num_max} is {n + num_max}: lower {max_param} or shorten the prompt",
            param=max_param,
        )
    return num_max, False


def _message(m: ChatMessage) -> dict[str, Any]:
    # Chat templates expect string content; text parts are joined as vLLM joins them.
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
    message: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    return message


def _refuse_unsupported(
    req: GenerationRequest, table: dict[str, tuple[tuple[Any, ...], str]]
) -> None:
    for name, (neutral, supported) in table.items():
        value = getattr(req, name)
        if value not in neutral:
            raise InvalidRequestError(f"{name}={value!r} is not supported ({supported})", name)


def _check_token_ids(ids: Sequence[int], limits: Limits, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"token id {bad} in {param} is outside the vocabulary [0, {limits.vocab_size})",
            param=param,
        )


def _logit_bias(bias: dict[str, float] | None, limits: Limits) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> (id, bias) pairs in id order; SamplingParams checks the
    values."""
    pairs = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= limits.vocab_size:
            raise InvalidRequestError(
                f"logit_bias key {key!r} is not a token id in [0, {limits.vocab_size})",
                param="logit_bias",
            )
        pairs.append((int(key), value))
    return tuple(sorted(pairs))
