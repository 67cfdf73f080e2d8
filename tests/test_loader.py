"""Checkpoint loading: every unusable model directory fails with a ModelLoadError that names the
problem; sharded, unsharded, fp32/fp16/bf16 and tied checkpoints load to the same model; and
the tiny models `init_tiny` writes are real Hugging Face checkpoints that transformers loads
and computes the same logits from."""

from __future__ import annotations

import json
import shutil
import struct
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignedserve.common.errors import ModelLoadError
from alignedserve.common.model_config import ARCHITECTURES
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.kv_cache import TORCH_DTYPES
from alignedserve.worker.loader import INDEX_FILE, checkpoint_files, load_model
from alignedserve.worker.runner import SeqChunk
from alignedserve.worker.tiny import BOS, EOS, TINY_CONFIGS, init_tiny, write_safetensors

from factories import random_prompts, save_hf_model

PROMPT_LENGTHS = (3, 11, 17)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A pristine tiny Llama dir (untied lm_head); tests break copies of it, never it."""
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture
def model_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def prefill_logits(runtime: LocalRuntime, prompts: list[list[int]]) -> torch.Tensor:
    """Our logits for every prompt token, prompts batched: [sum(len), vocab]."""
    tables = [runtime.allocator.allocate(runtime.layout.blocks_for(len(p))) for p in prompts]
    chunks = [
        SeqChunk(str(i), tuple(p), 0, tuple(t), None)
        for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
    ]
    try:
        with torch.no_grad():
            return runtime.runner.forward(chunks, all_logits=True)
    finally:
        for t in tables:
            runtime.allocator.free(t)


def runtime(path: Path, dtype: str | None = None) -> LocalRuntime:
    return LocalRuntime.from_dir(path, dtype=dtype, num_blocks=64, block_tokens=4,
                                 load_tokenizer=False)  # fmt: skip


def edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS), {"format": "pt"})


# --- unusable model directories ---------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert "nope" in str(e.value)


def test_no_config_json(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_model(model_dir)


def test_config_json_invalid(model_dir):
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelLoadError, match="invalid JSON") as e:
        load_model(model_dir)
    assert "config.json" in str(e.value)


def test_config_json_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(model_dir)


def test_unknown_architecture_lists_supported(model_dir):
    edit_config(model_dir, lambda raw: raw.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ModelLoadError, match="unsupported architecture") as e:
        load_model(model_dir)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ARCHITECTURES:
        assert arch in msg


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ],
)
def test_required_config_field_missing(model_dir, field):
    edit_config(model_dir, lambda raw: raw.pop(field))
    with pytest.raises(ModelLoadError, match=f"required field '{field}' missing"):
        load_model(model_dir)


def test_no_safetensors(model_dir):
    (model_dir / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=r"has no \*\.safetensors weights"):
        load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(model_dir, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match="checkpoint lacks tensors") as e:
        load_model(model_dir)
    assert name in str(e.value)


def test_misshaped_tensor_names_both_shapes(model_dir):
    name = "model.layers.0.self_attn.k_proj.weight"  # 2 kv heads × 16 = 32 rows, 64 columns
    edit_weights(model_dir, lambda t: t.update({name: torch.zeros(33, 64)}))
    with pytest.raises(ModelLoadError) as e:
        load_model(model_dir)
    msg = str(e.value)
    assert name in msg
    assert "(33, 64)" in msg
    assert "(32, 64)" in msg


def test_unexpected_tensor(model_dir):
    name = "model.layers.0.self_attn.extra_proj.weight"
    edit_weights(model_dir, lambda t: t.update({name: torch.zeros(4, 4)}))
    with pytest.raises(ModelLoadError, match="unexpected tensor") as e:
        load_model(model_dir)
    assert name in str(e.value)
    assert "LlamaForCausalLM" in str(e.value)


def test_stale_rotary_inv_freq_is_ignored(model_dir):
    # Older checkpoints carry a rotary buffer that we recompute: it must not be "unexpected".
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_weights(model_dir, lambda t: t.update({name: torch.zeros(8)}))
    model = load_model(model_dir)
    assert name not in dict(model.named_parameters())


@pytest.mark.parametrize(
    "content",
    [b"\xff" * 64 + b"not a safetensors file", b"", (8).to_bytes(8, "little") + b"{garbage"],
    ids=["huge-header", "empty", "bad-header-json"],
)
def test_corrupt_safetensors(model_dir, content):
    (model_dir / WEIGHTS).write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read safetensors") as e:
        load_model(model_dir)
    assert WEIGHTS in str(e.value)


def test_truncated_safetensors(model_dir):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(model_dir)


def test_index_names_missing_shard(model_dir):
    tensors = load_file(str(model_dir / WEIGHTS))
    (model_dir / WEIGHTS).rename(model_dir / "model-00001-of-00002.safetensors")
    weight_map = {
        name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(tensors)
    }
    (model_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="which does not exist") as e:
        load_model(model_dir)
    assert "model-00002-of-00002.safetensors" in str(e.value)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}'], ids=["bad-json", "no-map"])
def test_invalid_index(model_dir, content):
    (model_dir / INDEX_FILE).write_text(content)
    with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
        load_model(model_dir)


def test_no_tokenizer_json(model_dir):
    (model_dir / "tokenizer.json").unlink()
    assert load_model(model_dir) is not None  # the weights themselves are fine
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        LocalRuntime.from_dir(model_dir)


# --- checkpoints that load --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])  # qwen2 and opt have tied heads
def test_sharded_equals_unsharded(arch, tmp_path):
    hf = save_hf_model(arch, tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = tmp_path / "sharded" / INDEX_FILE
    assert index.is_file()
    assert not (tmp_path / "sharded" / WEIGHTS).exists()
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2
    assert checkpoint_files(tmp_path / "sharded") == [tmp_path / "sharded" / s for s in shards]
    assert checkpoint_files(tmp_path / "single") == [tmp_path / "single" / WEIGHTS]

    prompts = random_prompts(PROMPT_LENGTHS)
    single = prefill_logits(runtime(tmp_path / "single"), prompts)
    sharded = prefill_logits(runtime(tmp_path / "sharded"), prompts)
    assert (single - sharded).abs().max().item() == 0


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp32_checkpoint_cast_on_load(tiny_llama, dtype):
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    ref = prefill_logits(runtime(tiny_llama), prompts)
    cast = runtime(tiny_llama, dtype=dtype)
    params = dict(cast.runner.model.named_parameters())
    assert params and all(p.dtype == TORCH_DTYPES[dtype] for p in params.values())
    assert cast.runner.kv_cache.dtype == TORCH_DTYPES[dtype]
    got = prefill_logits(cast, prompts)
    assert got.dtype == TORCH_DTYPES[dtype]
    assert torch.isfinite(got).all()
    assert cosine(got, ref).min().item() > 0.99


def test_fp16_checkpoint_keeps_its_dtype(tmp_path):
    path = init_tiny(tmp_path / "fp16", arch="qwen3", dtype="float16")
    stored = load_file(str(path / WEIGHTS))
    assert all(t.dtype == torch.float16 for t in stored.values())
    model = load_model(path)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, stored[name])  # no round trip through another dtype


@pytest.mark.parametrize(
    "arch, embedding",
    [("qwen2", "model.embed_tokens"), ("opt", "model.decoder.embed_tokens")],
)
def test_tied_embeddings_share_storage(tmp_path, arch, embedding):
    assert TINY_CONFIGS[arch]["tie_word_embeddings"]
    path = init_tiny(tmp_path / arch, arch=arch)
    assert "lm_head.weight" not in load_file(str(path / WEIGHTS))
    model = load_model(path)
    embed = model.get_submodule(embedding).weight
    assert model.lm_head.weight is embed
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
    # Some tied checkpoints still store lm_head.weight; it is skipped and the tie kept.
    path = init_tiny(tmp_path / "qwen2", arch="qwen2")
    edit_weights(path, lambda t: t.update({"lm_head.weight": torch.randn(320, 64)}))
    model = load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- init_tiny against transformers -----------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_init_tiny_loads_in_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = init_tiny(tmp_path / arch, arch=arch)
    hf, info = AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    hf.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], (key, info[key])

    prompts = random_prompts(PROMPT_LENGTHS, seed=4)
    ours = prefill_logits(runtime(path), prompts)
    start = 0
    with torch.no_grad():
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0]
            assert (ours[start : start + len(p)] - ref).abs().max().item() <= 1e-4
            start += len(p)

    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    text = "Hello, wörld"
    ids = tok(text).input_ids
    assert ids == Tokenizer.from_dir(path).encode(text)
    assert ids[0] == BOS and len(ids) == 1 + len(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text


# --- init_tiny's writer: seeded per device, tensor by tensor ----------------------------------

CUDA = pytest.param(
    "cuda:0", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_init_tiny_same_seed_same_bytes(tmp_path, device):
    def files(name: str, seed: int, on: str = device) -> dict[str, bytes]:
        path = init_tiny(tmp_path / name, arch="opt", seed=seed, dtype="bfloat16", device=on)
        return {f.name: f.read_bytes() for f in path.iterdir()}

    first, again, other = files("first", 3), files("again", 3), files("other", 4)
    assert WEIGHTS in first and "config.json" in first
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert first[name] == again[name], f"{name} differs for the same seed"
    assert other[WEIGHTS] != first[WEIGHTS]
    for name in set(first) - {WEIGHTS}:
        assert other[name] == first[name], f"{name} depends on the seed"
    if device != "cpu":  # documented: CUDA's generator draws other numbers than the CPU's
        on_cpu = files("cpu", 3, "cpu")[WEIGHTS]
        assert on_cpu != first[WEIGHTS]
        assert len(on_cpu) == len(first[WEIGHTS])  # same header, same layout


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_init_tiny_bf16_has_transformers_parameters(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = init_tiny(tmp_path / arch, arch=arch, dtype="bfloat16")
    stored = load_file(str(path / WEIGHTS))
    hf, info = AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.bfloat16
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], (key, info[key])
    expected = dict(hf.named_parameters())  # a tied lm_head is listed once, as the embedding
    assert stored.keys() == expected.keys()
    for name, t in stored.items():
        assert (t.shape, t.dtype) == (expected[name].shape, torch.bfloat16), name
        assert torch.equal(expected[name].detach(), t), name
        if name.endswith("bias"):
            assert not t.any(), name
        elif t.dim() == 1:
            assert (t == 1).all(), name
        else:
            assert 0.018 < t.float().std().item() < 0.022, name


def test_write_safetensors_streams_in_layout_order(tmp_path):
    layout = [
        ("z.weight", (3, 5), torch.bfloat16),
        ("a.bias", (7,), torch.float32),
        ("m.weight", (2, 2, 2), torch.float16),
    ]
    expected = {name: torch.randn(shape).to(dt) for name, shape, dt in layout}
    refs: list[weakref.ref] = []

    def produced():
        for name, _, _ in layout:
            assert all(r() is None for r in refs), "the writer still holds an earlier tensor"
            t = expected[name].clone()
            refs.append(weakref.ref(t))
            yield name, t
            del t

    file = tmp_path / "x.safetensors"
    write_safetensors(file, layout, produced(), {"format": "pt"})
    stored = load_file(str(file))
    assert stored.keys() == expected.keys()
    for name, t in expected.items():
        assert stored[name].dtype == t.dtype and torch.equal(stored[name], t), name
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header_len % 8 == 0
    header = json.loads(data[8 : 8 + header_len])
    offsets = [header[name]["data_offsets"] for name, _, _ in layout]
    assert offsets == [[0, 30], [30, 58], [58, 74]]  # generation order, not name order
    assert len(data) == 8 + header_len + 74


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([("a", torch.zeros(2))], "expected b .* got nothing"),
        ([("a", torch.zeros(2)), ("b", torch.zeros(3))], r"got b \(3,\)"),
        ([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.float16))], "float16"),
        ([("b", torch.zeros(2)), ("a", torch.zeros(2))], "expected a .* got b"),
        ([("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(2))], "more tensors"),
    ],
    ids=["too-few", "shape", "dtype", "order", "too-many"],
)
def test_write_safetensors_rejects_tensors_the_header_does_not_describe(tmp_path, tensors, message):
    layout = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(ValueError, match=message):
        write_safetensors(tmp_path / "x.safetensors", layout, iter(tensors), {})
