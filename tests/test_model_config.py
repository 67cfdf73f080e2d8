"""ModelConfig.from_dict / from_dir: Hugging Face config.json (transformers v4 and v5 spellings)
into one frozen type; everything we cannot serve faithfully is a ModelLoadError."""

from __future__ import annotations

import json
from typing import Any

import pytest

from alignedserve.common.errors import ModelLoadError
from alignedserve.common.model_config import ModelConfig, RopeConfig

# Llama-3.1-8B's config.json as published (transformers v4 spelling).
LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

SMALL: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def cfg(arch: str = "LlamaForCausalLM", **fields: Any) -> ModelConfig:
    """Parse a small llama-family config of `arch`; a field set to None is left out."""
    raw = dict(SMALL, architectures=[arch], **fields)
    return ModelConfig.from_dict({k: v for k, v in raw.items() if v is not None})


# --- RoPE --------------------------------------------------------------------------------------

LLAMA3_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
ROPE_CASES = {
    "default": (
        RopeConfig(theta=1e6),
        [
            dict(rope_theta=1e6),
            dict(rope_theta=1e6, rope_scaling=None),
            dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        ],
    ),
    "linear": (
        RopeConfig(theta=10000.0, rope_type="linear", factor=4.0),
        [
            dict(rope_theta=10000, rope_scaling=dict(rope_type="linear", factor=4.0)),
            dict(rope_scaling=dict(type="linear", factor=4.0)),  # theta defaults to 10000
            dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
        ],
    ),
    "llama3": (
        RopeConfig(theta=500000.0, rope_type="llama3", **LLAMA3_SCALING),
        [
            dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING, rope_type="llama3")),
            dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING, type="llama3")),
            dict(rope_parameters=dict(LLAMA3_SCALING, rope_type="llama3", rope_theta=5e5)),
        ],
    ),
}


@pytest.mark.parametrize("style", ["v4", "v4-legacy-type", "v5"])
@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_rope_v4_and_v5_spellings_agree(rope_type, style):
    expected, spellings = ROPE_CASES[rope_type]
    fields = spellings[["v4", "v4-legacy-type", "v5"].index(style)]
    rope = cfg(**fields).rope
    assert rope == expected
    assert isinstance(rope.theta, float)


def test_rope_defaults_when_absent():
    assert cfg().rope == RopeConfig(theta=10000.0)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("yarn", dict(rope_theta=1e4, rope_scaling=dict(rope_type="yarn", factor=4.0))),
        ("yarn", dict(rope_scaling=dict(type="yarn", factor=4.0))),
        ("yarn", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0))),
        ("dynamic", dict(rope_scaling=dict(type="dynamic", factor=2.0))),
    ],
    ids=["v4", "v4-legacy-type", "v5", "dynamic"],
)
def test_unsupported_rope_type(name, fields):
    with pytest.raises(ModelLoadError, match=f"rope type '{name}' unsupported") as e:
        cfg(**fields)
    assert "llama3" in str(e.value)  # lists what is supported


def test_opt_has_no_rope():
    raw = dict(
        architectures=["OPTForCausalLM"],
        vocab_size=320,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = ModelConfig.from_dict(raw)
    assert (config.family, config.rope, config.num_kv_heads, config.head_dim) == (
        "opt",
        None,
        4,
        16,
    )
    assert config.tie_word_embeddings and config.attention_bias and config.output_bias


# --- special tokens and dtype ----------------------------------------------------------------


@pytest.mark.parametrize(
    "eos, expected", [(2, (2,)), ([2, 7, 9], (2, 7, 9)), ([5], (5,)), (None, ())]
)
def test_eos_token_id_int_or_list(eos, expected):
    config = cfg(eos_token_id=eos, bos_token_id=1)
    assert config.eos_token_ids == expected
    assert config.bos_token_id == 1


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(dtype="bfloat16"), "bfloat16"),
        (dict(torch_dtype="float16"), "float16"),
        (dict(dtype="bfloat16", torch_dtype="float32"), "bfloat16"),  # v5 key wins
        ({}, "float32"),
    ],
)
def test_dtype_from_dtype_or_torch_dtype(fields, expected):
    assert cfg(**fields).dtype == expected


def test_unsupported_dtype():
    with pytest.raises(ModelLoadError, match="dtype 'int8'"):
        cfg(torch_dtype="int8")


# --- per-architecture attention details ------------------------------------------------------


@pytest.mark.parametrize(
    "arch, fields, attention_bias, output_bias",
    [
        ("LlamaForCausalLM", {}, False, False),
        ("LlamaForCausalLM", dict(attention_bias=True), True, True),
        ("Qwen2ForCausalLM", {}, True, False),
        ("Qwen2ForCausalLM", dict(attention_bias=False), True, False),  # Qwen2 always has it
        ("Qwen3ForCausalLM", {}, False, False),
        ("Qwen3ForCausalLM", dict(attention_bias=True), True, True),
    ],
)
def test_attention_bias(arch, fields, attention_bias, output_bias):
    config = cfg(arch, **fields)
    assert (config.attention_bias, config.output_bias) == (attention_bias, output_bias)


@pytest.mark.parametrize(
    "arch, qk_norm",
    [
        ("LlamaForCausalLM", False),
        ("MistralForCausalLM", False),
        ("Qwen2ForCausalLM", False),
        ("Qwen3ForCausalLM", True),
    ],
)
def test_qk_norm_only_for_qwen3(arch, qk_norm):
    config = cfg(arch, head_dim=32)
    assert config.qk_norm is qk_norm
    assert config.family == "llama"
    assert config.head_dim == 32


@pytest.mark.parametrize(
    "arch, fields, window",
    [
        ("MistralForCausalLM", dict(sliding_window=4096), 4096),
        ("MistralForCausalLM", dict(sliding_window=None), None),
        ("LlamaForCausalLM", dict(sliding_window=4096), None),
        ("Qwen2ForCausalLM", dict(sliding_window=4096, use_sliding_window=False), None),
    ],
)
def test_sliding_window(arch, fields, window):
    assert cfg(arch, **fields).sliding_window == window


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_qwen_use_sliding_window_rejected(arch):
    with pytest.raises(ModelLoadError, match="use_sliding_window"):
        cfg(arch, use_sliding_window=True, sliding_window=4096)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ModelLoadError, match="not a multiple") as e:
        cfg(num_attention_heads=6, num_key_value_heads=4, head_dim=16)
    assert "num_attention_heads=6" in str(e.value)
    assert "num_key_value_heads=4" in str(e.value)


@pytest.mark.parametrize(
    "field",
    [
        "num_hidden_layers",
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
    ],
)
def test_non_positive_sizes_rejected(field):
    with pytest.raises(ModelLoadError, match="must be > 0"):
        cfg(**{field: 0})


def test_head_dim_and_kv_heads_defaults():
    config = cfg(num_key_value_heads=None)
    assert (config.num_kv_heads, config.head_dim) == (4, 16)  # MHA; hidden / heads


def test_unsupported_activation():
    with pytest.raises(ModelLoadError, match="hidden_act='gelu'"):
        cfg(hidden_act="gelu")


def test_unknown_architecture_lists_supported():
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as e:
        cfg("GPT2LMHeadModel")
    assert "Qwen3ForCausalLM" in str(e.value)


# --- a real model's numbers ------------------------------------------------------------------


def test_llama31_8b():
    config = ModelConfig.from_dict(LLAMA31_8B)
    assert config.kv_bytes_per_token == 131072  # 32 layers × (K, V) × 8 heads × 128 × 2 bytes
    assert (config.num_layers, config.num_kv_heads, config.head_dim) == (32, 8, 128)
    assert config.dtype == "bfloat16"
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert config.rope == RopeConfig(theta=500000.0, rope_type="llama3", **LLAMA3_SCALING)
    assert not (config.attention_bias or config.output_bias or config.qk_norm)
    assert config.sliding_window is None


@pytest.mark.parametrize("dtype, per_token", [("bfloat16", 131072), ("float32", 262144)])
def test_kv_bytes_scale_with_dtype(dtype, per_token):
    assert ModelConfig.from_dict(dict(LLAMA31_8B, torch_dtype=dtype)).kv_bytes_per_token == (
        per_token
    )


def test_from_dir_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    assert ModelConfig.from_dir(tmp_path) == ModelConfig.from_dict(LLAMA31_8B)
