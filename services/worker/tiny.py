"""`alignedserve model init-tiny`: a small random-weight checkpoint in Hugging Face format,
with a byte-level tokenizer, so any machine can serve and test without a model hub.

The config.json written is a valid transformers config for the architecture, so transformers
can load the same directory (the tests use that as an independent reference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alignedserve.common.model_config import ModelConfig
from alignedserve.common.tokenizer import write_byte_tokenizer
from alignedserve.worker.kv_cache import TORCH_DTYPES
from alignedserve.worker.models import FAMILIES

BOS, EOS, EOT = 256, 257, 260  # ids fixed by write_byte_tokenizer
VOCAB = 320  # byte tokens + specials, rounded up to a multiple of 64

_LLAMA_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        _LLAMA_COMMON,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),
    "mistral": dict(
        _LLAMA_COMMON,
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        sliding_window=1024,
    ),
    "qwen2": dict(
        _LLAMA_COMMON,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        _LLAMA_COMMON,
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        head_dim=32,
    ),
    "opt": dict(
        architectures=["OPTForCausalLM"],
        model_type="opt",
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        word_embed_proj_dim=64,
        do_layer_norm_before=True,
        activation_function="relu",
        enable_bias=True,
        pad_token_id=1,
        tie_word_embeddings=True,
    ),
}

# Full-size shapes for random-weight GPU benchmarks: TINY_CONFIGS["llama"] updated with these
# (init_tiny(..., overrides=FULL_SIZE["llama3-8b"])) is a Llama-3-8B-shaped model.
FULL_SIZE: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling=None,
    ),
    # OPT-13B (MHA, 40 x 128 heads) over TINY_CONFIGS["opt"]; positions beyond OPT's 2048 so
    # that the long prompts of the paper's mixes fit
    "opt-13b": dict(
        vocab_size=50272,
        hidden_size=5120,
        ffn_dim=20480,
        num_hidden_layers=40,
        num_attention_heads=40,
        word_embed_proj_dim=5120,
        max_position_embeddings=16384,
    ),
}


def init_tiny(
    model_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json."""
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(TINY_CONFIGS[arch], bos_token_id=BOS, eos_token_id=EOS, torch_dtype=dtype)
    raw.update(overrides or {})
    num_tokens = write_byte_tokenizer(path, vocab_size=raw["vocab_size"])
    assert raw["vocab_size"] >= num_tokens, "tokenizer outgrew the tiny vocab"
    config = ModelConfig.from_dict(raw)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": [EOS, EOT]}, indent=2) + "\n"
    )
    save_file(
        random_state_dict(config, seed, dtype), str(path / "model.safetensors"), {"format": "pt"}
    )
    return path


def random_state_dict(config: ModelConfig, seed: int, dtype: str) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and embeddings, zero biases, unit norms: a well-conditioned
    random model whose greedy tokens are stable under small numeric differences."""
    gen = torch.Generator().manual_seed(seed)
    model = FAMILIES[config.family](config)
    tensors = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("bias"):
            t = torch.zeros(p.shape)
        elif p.dim() == 1:  # norm weights
            t = torch.ones(p.shape)
        else:
            t = torch.randn(p.shape, generator=gen) * 0.02
        tensors[name] = t.to(TORCH_DTYPES[dtype]).contiguous()
    return tensors
