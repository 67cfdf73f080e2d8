"""OpenAI's response shapes for /v1/completions and /v1/chat/completions: streamed chunks and
whole responses, built from the same deltas."""

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
    def prelude(self) -> list[Json]:
        """Chunks streamed before the first delta."""
        ...

    def chunk(self, delta: Delta) -> Json | None:
        """The streamed chunk for one delta; None when it has nothing to tell."""
        ...

    def usage_chunk(self, usage: Usage) -> Json: ...

    def response(self, deltas: Sequence[Delta]) -> Json:
        """The whole, non-streamed response."""
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

    def prelude(self) -> list[Json]:
        return []

    def usage_chunk(self, usage: Usage) -> Json:
        return {**self._envelope(self.chunk_object_name, []), "usage": usage_json(usage)}


class CompletionFormat(_Format):
    chunk_object_name = "text_completion"

    def __init__(
        self, request_id: str, model: str, created: int, tokenizer: Tokenizer, logprobs: bool
    ):
        super().__init__(request_id, model, created, tokenizer, logprobs)
        self._text_offset = 0  # of the next token in the completion's text

    def _logprobs_json(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> Json | None:
        if not self._logprobs:
            return None
        result: Json = {"tokens": [], "token_logprobs": [], "text_offset": []}
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            token = self._token_text(token_id)
            result["tokens"].append(token)
            result["token_logprobs"].append(logprob)
            result["text_offset"].append(self._text_offset)
            self._text_offset += len(token)
        # Alternatives are not computed: top_logprobs stays null.
        return {**result, "top_logprobs": None}

    def _choice(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        finish_reason: str | None,
    ) -> Json:
        return {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs_json(token_ids, logprobs),
            "finish_reason": finish_reason,
        }

    def chunk(self, delta: Delta) -> Json | None:
        if self._is_empty(delta):
            return None
        choice = self._choice(delta.text, delta.token_ids, delta.logprobs, delta.finish_reason)
        return self._envelope(self.chunk_object_name, [choice])

    def response(self, deltas: Sequence[Delta]) -> Json:
        last = deltas[-1]
        assert last.usage is not None, "the last delta carries usage"
        choice = self._choice(
            "".join(d.text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            [lp for d in deltas for lp in d.logprobs],
            last.finish_reason,
        )
        return {**self._envelope("text_completion", [choice]), "usage": usage_json(last.usage)}


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

    def prelude(self) -> list[Json]:
        # OpenAI's first chunk names the role, with empty content.
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._envelope(self.chunk_object_name, [choice])]

    def chunk(self, delta: Delta) -> Json | None:
        if self._is_empty(delta):
            return None
        choice = {
            "index": 0,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs_json(delta.token_ids, delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope(self.chunk_object_name, [choice])

    def response(self, deltas: Sequence[Delta]) -> Json:
        last = deltas[-1]
        assert last.usage is not None, "the last delta carries usage"
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
            "logprobs": self._logprobs_json(
                [t for d in deltas for t in d.token_ids],
                [lp for d in deltas for lp in d.logprobs],
            ),
            "finish_reason": last.finish_reason,
        }
        return {**self._envelope("chat.completion", [choice]), "usage": usage_json(last.usage)}
