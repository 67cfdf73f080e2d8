"""`alignedserve model init-tiny`: a small random-weight checkpoint in Hugging Face format,
with a byte-level tokenizer, so any machine can serve and test without a model hub.

The config.json written is a valid transformers config for the architecture, so transformers
can load the same directory (the tests use that as an independent reference).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

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

# each full-size shape's family in TINY_CONFIGS (and models.FAMILIES)
SHAPE_FAMILIES = {"llama3-8b": "llama", "opt-13b": "opt"}


def init_tiny(
    model_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json.

    The weights are drawn on `device` (a CUDA device draws a full-size model in seconds where
    the CPU takes minutes) and written one tensor at a time: host memory holds at most about
    one tensor, never the whole state dict. The same seed on the same kind of device gives a
    byte-identical checkpoint; the CPU and CUDA generators draw different numbers for the
    same seed, so a model drawn on "cpu" and one drawn on "cuda" differ.
    """
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
    specs = parameter_specs(config)
    write_safetensors(
        path / "model.safetensors",
        [(name, shape, TORCH_DTYPES[dtype]) for name, shape in specs],
        random_tensors(specs, seed, dtype, device),
        {"format": "pt"},
    )
    return path


def parameter_specs(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored parameter, in the order the model declares them; the
    model is built on the meta device, so this allocates nothing."""
    with torch.device("meta"):
        model = FAMILIES[config.family](config)
    return [
        (name, tuple(p.shape))
        for name, p in model.named_parameters()
        if not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]


def random_tensors(
    specs: list[tuple[str, tuple[int, ...]]],
    seed: int,
    dtype: str,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for each spec, in order: Normal(0, 0.02) matrices and embeddings,
    zero biases, unit norms — a well-conditioned random model whose greedy tokens are stable
    under small numeric differences. Matrices are drawn on `device` from one generator seeded
    with `seed`, in spec order, so the output depends only on (specs, seed, dtype, device
    type)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in specs:  # no local keeps a yielded tensor alive while the next is drawn
        yield name, _random_tensor(name, shape, gen, TORCH_DTYPES[dtype])


def _random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=dtype)
    drawn = torch.randn(shape, generator=gen, device=gen.device).mul_(0.02)
    return drawn.to(device="cpu", dtype=dtype).contiguous()


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(
    file: Path,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
) -> None:
    """A safetensors file written tensor by tensor: the header (every name, dtype, shape and
    offset, from `layout`) first, then each tensor's bytes as `tensors` yields it, in
    `layout`'s order. safetensors readers order tensors by offset, so the data may follow
    generation order rather than name order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dt in layout:
        size = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        produced = iter(tensors)
        for name, shape, dt in layout:
            got_name, t = next(produced, (None, None))
            if t is None or (got_name, tuple(t.shape), t.dtype) != (name, shape, dt):
                got = "nothing" if t is None else f"{got_name} {tuple(t.shape)} {t.dtype}"
                raise ValueError(f"{file}: expected {name} {shape} {dt}, got {got}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            del t  # released before the next tensor is produced
        if next(produced, None) is not None:
            raise ValueError(f"{file}: more tensors than the layout names")
