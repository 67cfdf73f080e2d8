"""alignedserve.common.tokenizer against Hugging Face transformers on the same files.

transformers is the reference the rest of the ecosystem serves with, so every encode, decode
and chat rendering here must match it exactly; it is only imported by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from alignedserve.common.errors import InvalidRequestError, ModelLoadError
from alignedserve.common.tokenizer import Tokenizer, write_byte_tokenizer

TEXTS = [
    "",
    "hello world",
    "  two leading spaces, trailing ",
    "line one\nline two\r\n\n\ttabbed",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト",
    "mixed: é ß ñ Ω — “quotes” 🙂世界",
    "text with <|eot_id|> a special token inside",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse. 🙂"},
    {"role": "user", "content": "  Hi there!\nWhat is 世界?  "},
    {"role": "assistant", "content": "It means 'world'."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_byte_tokenizer(tmp_path)
    return tmp_path


@pytest.fixture
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def hf_tokenizer(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def update_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip_special_tokens)
    return [detok.step(i) for i in ids]


def test_byte_tokenizer_layout(tmp_path: Path) -> None:
    vocab = write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert vocab == tok.vocab_size == 261
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    byte_symbols = {t for t, i in backend.get_vocab().items() if i < 256}
    assert byte_symbols == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    specials += ["<|end_header_id|>", "<|eot_id|>"]
    assert [backend.token_to_id(t) for t in specials] == [256, 257, 258, 259, 260]
    assert tok.bos_token_id == 256
    assert tok.eos_token_ids == (257,)  # the eot id comes from generation_config.json
    # Every UTF-8 byte is exactly one id below 256, so any text round-trips without a download.
    text = "héllo 🙂 世界"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()) and all(0 <= i < 256 for i in ids)
    assert tok.encode(text)[0] == 256 and tok.encode(text)[1:] == ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(model_dir: Path, tok: Tokenizer, text: str) -> None:
    hf = hf_tokenizer(model_dir)
    for add_special in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert tok.decode(tok.encode(text)) == text.replace("<|eot_id|>", "")
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<|begin_of_text|>" + text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    model_dir: Path, tok: Tokenizer, add_generation_prompt: bool
) -> None:
    hf = hf_tokenizer(model_dir)
    ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert ours.count("<|eot_id|>") == len(CONVERSATION)
    tail = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ours.endswith(tail) == add_generation_prompt


def test_template_helpers_match_transformers(model_dir: Path) -> None:
    # tojson must not HTML-escape, loop controls must work, and chat_template.jinja wins over
    # the config key, all as in transformers.
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{{ eos_token }}"
    )
    messages = [
        {"role": "user", "content": "<b>a & b</b> 'q' 世界"},
        {"role": "skip", "content": "dropped"},
    ]
    ours = Tokenizer.from_dir(model_dir).apply_chat_template(messages)
    assert ours == hf_tokenizer(model_dir).apply_chat_template(messages, tokenize=False)
    assert "<b>a & b</b> 'q' 世界" in ours and "dropped" not in ours


def test_add_bos_token_in_config_is_ignored_like_transformers(model_dir: Path) -> None:
    # transformers 5 lets tokenizer.json's post-processor decide; a stale config flag must not
    # make the router and a transformers-based client disagree on the prompt ids.
    for add_bos, add_eos in [(False, False), (True, True)]:
        update_config(model_dir, add_bos_token=add_bos, add_eos_token=add_eos)
        tok, hf = Tokenizer.from_dir(model_dir), hf_tokenizer(model_dir)
        assert tok.encode("hi") == hf.encode("hi") == [256, *tok.encode("hi", False)]


@pytest.mark.parametrize("text", TEXTS[1:])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenizer_concatenates_to_decode(
    tok: Tokenizer, text: str, skip_special_tokens: bool
) -> None:
    ids = [*tok.encode(text), 260, *tok.encode("再见 👋", add_special_tokens=False), 257]
    pieces = stream(tok, ids, skip_special_tokens)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    # Never emits half a character: each piece is valid text on its own.
    assert all("\ufffd" not in p for p in pieces)


def test_partial_multibyte_char_yields_empty_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("a🙂b", add_special_tokens=False)
    assert len(ids) == 6  # 'a', four bytes of U+1F642, 'b'
    assert stream(tok, ids) == ["a", "", "", "", "🙂", "b"]
    three = tok.encode("世", add_special_tokens=False)
    assert stream(tok, three) == ["", "", "世"]


def test_flush_returns_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok🙂", add_special_tokens=False)[:-1]  # cut the emoji's last byte
    detok = tok.detokenizer()
    pieces = [detok.step(i) for i in ids]
    assert pieces == ["o", "k", "", "", ""]
    tail = detok.flush()
    assert tail and "".join(pieces) + tail == tok.decode(ids)
    assert detok.flush() == ""


@pytest.mark.parametrize("gen_eos", [[257, 260], 260, [260, 257, 260]])
def test_eos_ids_union_config_and_generation_config(model_dir: Path, gen_eos: Any) -> None:
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
    tok = Tokenizer.from_dir(model_dir)
    assert tok.eos_token_ids == (257, 260)
    assert tok.eos_token == "<|end_of_text|>" and tok.bos_token == "<|begin_of_text|>"


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*not found"):
        Tokenizer.from_dir(model_dir)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nope"}}', "[]"])
def test_corrupt_tokenizer_json(model_dir: Path, content: str) -> None:
    (model_dir / "tokenizer.json").write_text(content)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: not a valid tokenizer file"):
        Tokenizer.from_dir(model_dir)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("tokenizer_config.json", "{oops", "cannot read JSON"),
        ("tokenizer_config.json", '["a list"]', "expected a JSON object"),
        ("tokenizer_config.json", '{"eos_token": "<|nope|>"}', "not in tokenizer.json"),
        ("tokenizer_config.json", '{"chat_template": "{% for %}"}', "does not compile"),
        ("generation_config.json", '{"eos_token_id": "x"}', "int or a list of ints"),
    ],
)
def test_bad_side_files(model_dir: Path, name: str, content: str, problem: str) -> None:
    (model_dir / name).write_text(content)
    with pytest.raises(ModelLoadError, match=rf"{name}.*{problem}"):
        Tokenizer.from_dir(model_dir)


def test_template_raise_exception_is_invalid_request(model_dir: Path) -> None:
    update_config(
        model_dir,
        chat_template="{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool turns are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}",
    )
    tok = Tokenizer.from_dir(model_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "fine"}]) == "fine"
    with pytest.raises(InvalidRequestError, match="tool turns are not supported") as err:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert err.value.param == "messages"


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": 3, "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 42}],
    ],
)
def test_malformed_messages_are_invalid_request(tok: Tokenizer, messages: Any) -> None:
    with pytest.raises(InvalidRequestError) as err:
        tok.apply_chat_template(messages)
    assert err.value.param == "messages"


def test_no_chat_template_is_invalid_request(model_dir: Path) -> None:
    update_config(model_dir, chat_template=None)
    tok = Tokenizer.from_dir(model_dir)
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"


def test_import_is_torch_free() -> None:
    code = (
        "import alignedserve.common.tokenizer, sys; "
        "assert 'torch' not in sys.modules; assert 'transformers' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_padded_byte_tokenizer_decodes_every_id(tmp_path):
    """A random-weight model samples any id below its vocab size; padded to that size, the
    tiny tokenizer turns each into text (streamed benchmarks count tokens by text chunks)."""
    assert write_byte_tokenizer(tmp_path, vocab_size=1000) == 1000
    tok = Tokenizer.from_dir(tmp_path)
    detok = tok.detokenizer()
    pieces = [detok.step(i) for i in (500, 999, 261)]
    assert pieces == ["w500", "w999", "w261"]
    assert write_byte_tokenizer(tmp_path / "plain") == 261
    plain = Tokenizer.from_dir(tmp_path / "plain")
    text = "héllo, wörld"  # plain text still encodes byte by byte, as without the padding
    assert tok.encode(text) == plain.encode(text)
    assert write_byte_tokenizer(tmp_path / "small", vocab_size=10) == 261  # never shrinks
