"""Request bodies of the OpenAI-compatible API, as pydantic models.

Types are strict (no "5" for 5, no true for 1), as OpenAI's own API is. Unknown fields are
ignored, because clients and benchmark tools send vendor extensions; fields we know but do
not implement are declared, so that a value that would change the output is refused
(alignedserve.router.preprocess) instead of silently ignored. Values are range-checked by
SamplingParams and preprocess, which name the field in a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

_CONFIG = ConfigDict(strict=True, extra="ignore")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Union fields are checked as a whole before pydantic sees them: its own error for a union
# lists one complaint per member, under loc entries named after types.
def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(map(_is_int, value))


def _prompt(value: Any) -> Any:
    """One prompt (a string, or token ids) or a batch of them (a list of either kind)."""
    if isinstance(value, str) or _is_ids(value):
        return value
    if isinstance(value, list) and (
        all(isinstance(p, str) for p in value) or all(map(_is_ids, value))
    ):
        return value
    raise PydanticCustomError(
        "prompt_type",
        "must be a string, a list of token ids, or a batch: a list of strings or of token id lists",
    )


def _stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise PydanticCustomError("stop_type", "must be a string or a list of strings")


def _content(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return value
    raise PydanticCustomError(
        "content_type",
        "must be a string or a list of {'type': 'text', 'text': ...} parts "
        "(other content types are not supported)",
    )


Prompt = Annotated[str | list[int] | list[str] | list[list[int]], BeforeValidator(_prompt)]
Stop = Annotated[str | list[str] | None, BeforeValidator(_stop)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool | None = None
    # vLLM's extension: with include_usage, every chunk carries the usage so far, which
    # gives benchmark clients each chunk's exact token count
    continuous_usage_stats: bool | None = None


class GenerationRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = _CONFIG
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None (null is valid in OpenAI's API): 1.0
    top_p: float | None = None  # None: 1.0
    top_k: int | None = None  # extension: 0 or -1 (vLLM's spelling) = off
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool | None = None  # extension
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    n: int | None = None  # choices per prompt (None: 1)
    min_p: float | None = None  # extension (None: 0, off)
    logit_bias: dict[str, float] | None = None  # {"token id": added to its logit}
    # known, not implemented: refused unless neutral
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    logprobs: int | None = None  # 0 or 1: the sampled token's logprob
    # known, not implemented: refused unless neutral
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart], BeforeValidator(_content)]
    name: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    # known, not implemented: refused unless neutral
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
