"""OpenAI's response shapes for /v1/completions and /v1/chat/completions: streamed chunks and
whole responses, built from the same deltas, each delta of one choice (by its index)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from alignedserve.common.tokenizer import Tokenizer
from alignedserve.router.generation import Delta
from alignedserve.router.wire import Usage

Json = dict[str, Any]


def usage_json(usage: Usage) -> Json:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseFormat(Protocol):
    def prelude(self, num_choices: int) -> list[Json]:
        """Chunks streamed before the first delta."""
        ...

    def chunk(self, index: int, delta: Delta) -> Json | None:
        """The streamed chunk for one delta of choice `index`; None when it has nothing to
        tell."""
        ...

    def usage_chunk(self, usage: Usage) -> Json: ...

    def response(self, choices: Sequence[Sequence[Delta]], usage: Usage) -> Json:
        """The whole, non-streamed response: each choice's deltas, in index order."""
        ...


class _Format:
    """What both endpoints' formats share: identity fields and per-token logprob strings."""

    chunk_object_name: str

    def __init__(
        self, request_id: str, model: str, created: int, tokenizer: Tokenizer, logprobs: bool
    ):
        self._request_id = request_id
        self._model = model
        self._created = created
        self._tokenizer = tokenizer
        self._logprobs = logprobs

    def _envelope(self, object_name: str, choices: list[Json]) -> Json:
        return {
            "id": self._request_id,
            "object": object_name,
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }

    def _token_text(self, token_id: int) -> str:
        # Special tokens are named rather than dropped: the client asked about every token.
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _is_empty(self, delta: Delta) -> bool:
        # Text held back (half a character, a possible stop string) with nothing else to say.
        has_logprobs = self._logprobs and bool(delta.token_ids)
        return not (delta.text or delta.finish_reason or has_logprobs)

    def prelude(self, num_choices: int) -> list[Json]:
        return []

    def usage_chunk(self, usage: Usage) -> Json:
        return {**self._envelope(self.chunk_object_name, []), "usage": usage_json(usage)}


class CompletionFormat(_Format):
    chunk_object_name = "text_completion"

    def __init__(
        self, request_id: str, model: str, created: int, tokenizer: Tokenizer, logprobs: bool
    ):
        super().__init__(request_id, model, created, tokenizer, logprobs)
        self._text_offsets: dict[int, int] = {}  # choice -> its next token's text offset

    def _logprobs_json(
        self, index: int, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> Json | None:
        if not self._logprobs:
            return None
        result: Json = {"tokens": [], "token_logprobs": [], "text_offset": []}
        offset = self._text_offsets.get(index, 0)
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            token = self._token_text(token_id)
            result["tokens"].append(token)
            result["token_logprobs"].append(logprob)
            result["text_offset"].append(offset)
            offset += len(token)
        self._text_offsets[index] = offset
        # Alternatives are not computed: top_logprobs stays null.
        return {**result, "top_logprobs": None}

    def _choice(self, index: int, deltas: Sequence[Delta]) -> Json:
        return {
            "index": index,
            "text": "".join(d.text for d in deltas),
            "logprobs": self._logprobs_json(
                index, [t for d in deltas for t in d.token_ids],
                [lp for d in deltas for lp in d.logprobs],
            ),
            "finish_reason": deltas[-1].finish_reason,
        }  # fmt: skip

    def chunk(self, index: int, delta: Delta) -> Json | None:
        if self._is_empty(delta):
            return None
        return self._envelope(self.chunk_object_name, [self._choice(index, [delta])])

    def response(self, choices: Sequence[Sequence[Delta]], usage: Usage) -> Json:
        body = [self._choice(i, deltas) for i, deltas in enumerate(choices)]
        return {**self._envelope("text_completion", body), "usage": usage_json(usage)}


class ChatFormat(_Format):
    chunk_object_name = "chat.completion.chunk"

    def _logprobs_json(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> Json | None:
        if not self._logprobs:
            return None
        content = []
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            token = self._token_text(token_id)
            content.append(
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [],
                }
            )
        return {"content": content}

    def prelude(self, num_choices: int) -> list[Json]:
        # OpenAI's first chunk of each choice names the role, with empty content.
        return [
            self._envelope(
                self.chunk_object_name,
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}],
            )
            for i in range(num_choices)
        ]  # fmt: skip

    def chunk(self, index: int, delta: Delta) -> Json | None:
        if self._is_empty(delta):
            return None
        choice = {
            "index": index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs_json(delta.token_ids, delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope(self.chunk_object_name, [choice])

    def response(self, choices: Sequence[Sequence[Delta]], usage: Usage) -> Json:
        body = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                "logprobs": self._logprobs_json(
                    [t for d in deltas for t in d.token_ids],
                    [lp for d in deltas for lp in d.logprobs],
                ),
                "finish_reason": deltas[-1].finish_reason,
            }
            for i, deltas in enumerate(choices)
        ]
        return {**self._envelope("chat.completion", body), "usage": usage_json(usage)}
