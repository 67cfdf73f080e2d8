"""A model's shape, parsed once from a Hugging Face `config.json` into a frozen, torch-free type.

Both the worker (to build the model) and the batcher/router (KV bytes per token, context length)
read it, so it lives here and never imports torch. Everything we cannot serve faithfully is
rejected with a ModelLoadError naming the field, never silently approximated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignedserve.common.errors import ModelLoadError

# architecture name in config.json -> model family implemented in alignedserve.worker.models
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # "llama" (Llama, Mistral, Qwen2, Qwen3) or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str  # checkpoint dtype: float32 | float16 | bfloat16
    tie_word_embeddings: bool
    norm_eps: float
    hidden_act: str
    attention_bias: bool = False  # bias on q/k/v (Qwen2; Llama's attention_bias)
    output_bias: bool = False  # bias on o_proj / out_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral: key k visible to query q iff q - k < window
    rope: RopeConfig | None = None  # None for learned positions (OPT)
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in the checkpoint dtype."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPES[self.dtype]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model dir")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{config_path}: invalid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(config_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or '(none given)'}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        try:
            heads = raw["num_attention_heads"]
            if not isinstance(heads, int) or heads <= 0:
                raise ModelLoadError(f"{source}: num_attention_heads={heads!r} must be > 0")
            parsed = _parse_opt(raw) if family == "opt" else _parse_llama(raw, arch)
            parsed["vocab_size"] = raw["vocab_size"]
        except KeyError as e:
            raise ModelLoadError(f"{source}: required field {e.args[0]!r} missing") from e
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise ModelLoadError(f"{source}: dtype {dtype!r} not one of {list(DTYPES)}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        config = cls(
            architecture=arch,
            family=family,
            dtype=dtype,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **parsed,
        )
        config._validate(source)
        return config

    def _validate(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"{source}: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )


def _parse_llama(raw: dict[str, Any], arch: str) -> dict[str, Any]:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act={act!r} unsupported for {arch} (only 'silu')")
    sliding = None
    if arch == "MistralForCausalLM":
        sliding = raw.get("sliding_window")
    elif raw.get("use_sliding_window"):
        raise ModelLoadError(f"use_sliding_window=true is not supported for {arch}")
    is_qwen2 = arch == "Qwen2ForCausalLM"
    return dict(
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        hidden_act=act,
        attention_bias=is_qwen2 or raw.get("attention_bias", False),
        output_bias=(not is_qwen2) and raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=sliding,
        rope=_parse_rope(raw),
    )


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers v5 writes `rope_parameters`; v4 checkpoints carry rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"rope type {rope_type!r} unsupported; supported: {ROPE_TYPES}")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = {k: params[k] for k in fields if params.get(k) is not None}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **extra)


def _parse_opt(raw: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    act = raw.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ModelLoadError(f"activation_function={act!r} unsupported for OPT")
    if not raw.get("layer_norm_elementwise_affine", True):
        raise ModelLoadError("layer_norm_elementwise_affine=false is not supported for OPT")
    bias = raw.get("enable_bias", True)
    proj = raw.get("word_embed_proj_dim", hidden)
    return dict(
        hidden_size=hidden,
        intermediate_size=raw["ffn_dim"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        norm_eps=1e-5,
        hidden_act=act,
        attention_bias=bias,
        output_bias=bias,
        mlp_bias=bias,
        do_layer_norm_before=raw.get("do_layer_norm_before", True),
        word_embed_proj_dim=proj if proj != hidden else None,
        final_layer_norm=raw.get("do_layer_norm_before", True)
        and not raw.get("_remove_final_layer_norm", False),
    )
