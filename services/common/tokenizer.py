"""Text <-> token ids and chat prompts for one model directory, without torch or transformers.

The router tokenizes prompts and renders chat templates, and the worker streams detokenized text;
both must agree with Hugging Face transformers on the same files, so everything is delegated to
the `tokenizers` library (the Rust backend transformers itself uses) and to jinja2 configured the
way transformers configures it. This module only reads the side files transformers reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.decoders import DecodeStream

from alignedserve.common.errors import InvalidRequestError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer checkpoints keep the template here


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and '; transformers replaces it with plain
    # json.dumps, and tool-calling templates depend on that exact output.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    # Llama 3.1+ templates stamp the current date into the system prompt.
    return datetime.now().strftime(fmt)


# Chat templates come from the Hub and are untrusted code: same sandbox, whitespace handling,
# extension and helpers as transformers, so prompts render byte-identically.
_JINJA_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
)
_JINJA_ENV.filters["tojson"] = _tojson
_JINJA_ENV.globals["raise_exception"] = _raise_exception
_JINJA_ENV.globals["strftime_now"] = _strftime_now


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Special tokens are stored either as a plain string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class IncrementalDetokenizer:
    """Turns one sequence's token ids into text as they are generated.

    Wraps `tokenizers.decoders.DecodeStream`, which holds back text until a multi-byte character
    is complete. `''.join(step(i) for i in ids) + flush() == Tokenizer.decode(ids)`; flush() is
    only non-empty when the sequence ends mid-character.
    """

    def __init__(self, tokenizer: _RustTokenizer, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # Kept only so flush() can recover bytes DecodeStream still holds back.
        self._ids: list[int] = []
        self._emitted_chars = 0

    def step(self, token_id: int) -> str:
        """Text made final by `token_id`; '' while a multi-byte character is incomplete."""
        self._ids.append(token_id)
        text = self._stream.step(self._tokenizer, token_id) or ""
        self._emitted_chars += len(text)
        return text

    def flush(self) -> str:
        """Text still held back at the end of the sequence (an incomplete character decodes to
        U+FFFD, exactly as decode() renders it)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        rest = full[self._emitted_chars :]
        self._emitted_chars = len(full)
        return rest


class Tokenizer:
    """A model's tokenizer, special tokens and chat template, loaded from its directory."""

    def __init__(
        self,
        backend: _RustTokenizer,
        *,
        bos: tuple[str, int] | None,
        eos: tuple[str, int] | None,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
        template: jinja2.Template | None,
    ) -> None:
        self._backend = backend
        self.bos_token: str | None = bos[0] if bos else None
        self.eos_token: str | None = eos[0] if eos else None
        self.bos_token_id: int | None = bos[1] if bos else None
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._template = template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        root = Path(model_dir)
        if not root.is_dir():
            raise ModelLoadError(f"{root}: model directory not found")
        tok_path = root / TOKENIZER_FILE
        if not tok_path.is_file():
            raise ModelLoadError(f"{tok_path}: file not found (a fast tokenizer.json is required)")
        try:
            backend = _RustTokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust loader raises a bare Exception for any parse error
            raise ModelLoadError(f"{tok_path}: not a valid tokenizer file: {e}") from e

        cfg_path = root / TOKENIZER_CONFIG_FILE
        cfg = _read_json(cfg_path, required=False)
        gen_path = root / GENERATION_CONFIG_FILE
        gen = _read_json(gen_path, required=False)

        def special(key: str) -> tuple[str, int] | None:
            token = _token_content(cfg.get(key))
            if token is None:
                return None
            tid = backend.token_to_id(token)
            if tid is None:
                raise ModelLoadError(f"{cfg_path}: {key} {token!r} is not in {TOKENIZER_FILE}")
            return token, tid

        bos, eos = special("bos_token"), special("eos_token")
        # Instruct models stop on end-of-turn tokens listed only in generation_config.json.
        gen_eos = gen.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        if not isinstance(gen_eos_ids, list) or not all(isinstance(i, int) for i in gen_eos_ids):
            raise ModelLoadError(f"{gen_path}: eos_token_id must be an int or a list of ints")
        eos_ids = tuple(dict.fromkeys([*([eos[1]] if eos else []), *gen_eos_ids]))

        chat_template, source = cls._find_chat_template(root, cfg)
        template = None
        if chat_template is not None:
            try:
                template = _JINJA_ENV.from_string(chat_template)
            except jinja2.TemplateError as e:
                raise ModelLoadError(f"{source}: chat template does not compile: {e}") from e
        return cls(
            backend,
            bos=bos,
            eos=eos,
            eos_token_ids=eos_ids,
            chat_template=chat_template,
            template=template,
        )

    @staticmethod
    def _find_chat_template(root: Path, cfg: dict[str, Any]) -> tuple[str | None, Path]:
        # Same precedence as transformers: a chat_template.jinja file wins over the config key.
        jinja_path = root / CHAT_TEMPLATE_FILE
        if jinja_path.is_file():
            try:
                return jinja_path.read_text(encoding="utf-8"), jinja_path
            except (OSError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{jinja_path}: cannot read: {e}") from e
        cfg_path = root / TOKENIZER_CONFIG_FILE
        value = cfg.get("chat_template")
        if isinstance(value, list):
            # Older multi-template format: [{"name": ..., "template": ...}]; serve "default".
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if value is not None and not isinstance(value, str):
            raise ModelLoadError(f"{cfg_path}: chat_template must be a string")
        return value, cfg_path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 likewise drops
        # add_bos_token/add_eos_token from tokenizer_config.json whenever tokenizer.json exists.
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # No clean_up_tokenization_spaces: transformers 5 ignores it for BPE models, and it would
        # make decode() disagree with the streamed text.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._backend, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation to prompt text, exactly as transformers' apply_chat_template
        with tokenize=False. The text usually starts with bos_token already, so encode it with
        add_special_tokens=False."""
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt instead", param="messages"
            )
        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        # A template rejecting the conversation (raise_exception, or tripping over an
        # unexpected value) is the caller's fault, not the server's.
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as e:
            raise InvalidRequestError(
                f"chat template rejected messages: {e}", param="messages"
            ) from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise InvalidRequestError(f"messages[{i}].role must be a string", param="messages")
        # None is allowed for assistant turns that only carry tool calls; lists are content parts.
        if "content" not in m or not isinstance(m["content"], str | list | None):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of parts", param="messages"
            )


# Llama 3's template verbatim, so tiny test models exercise the same prompt shape as real ones.
_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
_BYTE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def write_byte_tokenizer(
    model_dir: str | os.PathLike[str], model_max_length: int = 2048, vocab_size: int | None = None
) -> int:
    """Writes tokenizer.json + tokenizer_config.json for tiny random-weight test models: a
    byte-level tokenizer that needs no download, loadable by our Tokenizer and by transformers'
    AutoTokenizer.

    Ids 0..255 are the 256 ByteLevel byte symbols (in code-point order of their printable
    stand-ins, not byte order); 256..260 are <|begin_of_text|> (bos), <|end_of_text|> (eos),
    <|start_header_id|>, <|end_header_id|>, <|eot_id|> (end of turn; listed as an eos id in
    generation_config.json by whoever writes the model config). BOS is prepended by the
    post-processor. With `vocab_size`, ordinary tokens "w<id>" fill the vocabulary up to it, so
    that every id a random-weight model can sample decodes to text (streamed benchmarks count
    tokens by the text chunks they receive). Returns the vocab size.
    """
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    # A BPE with no merges over the byte alphabet: every UTF-8 byte is exactly one token.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = _RustTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in _BYTE_SPECIAL_TOKENS]
    )
    size = backend.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and vocab_size > size:
        # ASCII only: the ByteLevel decoder passes printable ASCII through unchanged
        backend.add_tokens([AddedToken(f"w{i}", normalized=False) for i in range(size, vocab_size)])
    bos, eos = _BYTE_SPECIAL_TOKENS[0], _BYTE_SPECIAL_TOKENS[1]
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    backend.save(str(root / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": _LLAMA3_TEMPLATE,
    }
    (root / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return backend.get_vocab_size(with_added_tokens=True)
