"""Load a Hugging Face-format checkpoint directory into one of our model families.

The model is built on the meta device (no memory), then each tensor is read from the
memory-mapped safetensors file(s) and placed straight on the target device in the target
dtype, one tensor at a time: host memory never holds a second full copy of the weights.
To a GPU the bytes go through two pinned buffers in turn (`transfer.PinnedUpload`): the host
fills one while the other crosses PCIe, where safetensors' own device load copies each tensor
from pageable memory, one after another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from alignedserve.common.errors import ModelLoadError
from alignedserve.common.model_config import ModelConfig
from alignedserve.worker.kv_cache import TORCH_DTYPES
from alignedserve.worker.models import FAMILIES
from alignedserve.worker.transfer import PinnedUpload

INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that we recompute instead of loading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = [model_dir / name for name in sorted(shards)]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index} names shard {f.name!r}, which does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(model_dir)!r} has no *.safetensors weights")
    return files


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> nn.Module:
    path = Path(model_dir)
    config = ModelConfig.from_dir(path)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} not one of {list(TORCH_DTYPES)}")
    target_dtype = TORCH_DTYPES[dtype or config.dtype]
    with torch.device("meta"):
        model = FAMILIES[config.family](config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    loaded: set[str] = set()
    to_device = PinnedUpload(device) if torch.device(device).type == "cuda" else None
    for file in checkpoint_files(path):
        try:  # to a GPU: mapped host tensors, uploaded by to_device
            handle = safe_open(
                str(file), framework="pt", device="cpu" if to_device else str(device)
            )
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{file}: cannot read safetensors ({e})") from e
        with handle as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = key if key in expected else f"model.{key}"  # old OPT files lack "model."
                if name not in expected:
                    if key.endswith(IGNORED_SUFFIXES) or (
                        config.tie_word_embeddings and key == "lm_head.weight"
                    ):
                        continue
                    raise ModelLoadError(
                        f"{file.name}: unexpected tensor {key!r} for {config.architecture}"
                    )
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise ModelLoadError(
                        f"{file.name}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected[name])}"
                    )
                if to_device is not None:
                    tensor = to_device(tensor)
                param = nn.Parameter(tensor.to(device, target_dtype), requires_grad=False)
                _set_parameter(model, name, param)
                loaded.add(name)
    if to_device is not None:
        to_device.finish()
    missing = sorted(expected.keys() - loaded)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"{path}: checkpoint lacks tensors {missing[:3]}{more}")
    if config.tie_word_embeddings:
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "materialize_buffers"):
            module.materialize_buffers(device)
    if torch.device(device).type == "cuda":
        fuse_projections(model)
    return model.eval()


def fuse_projections(model: nn.Module) -> None:
    """q/k/v and gate/up as single GEMMs, and the RMSNorm weights before them folded into
    theirs. GPU only: on the CPU the parameters are views of the memory-mapped checkpoint,
    and concatenating them would copy the weights into RAM."""
    # Only the modules that fuse are listed: a list of all would keep every unfused
    # projection (q, k, v, gate, up) alive until the end, and their memory reserved.
    for module in [m for m in model.modules() if hasattr(m, "fuse_projections")]:
        module.fuse_projections()
    for module in [m for m in model.modules() if hasattr(m, "fold_norm_weights")]:
        module.fold_norm_weights()
    if torch.cuda.is_available():
        # The unfused weights and the fold's fp32 copies are free now, but the caching
        # allocator would keep them reserved, where sizing by the device's free memory (the
        # prefill device's decode blocks) does not see them (docs/benchmarks.md, twenty-
        # second session: 10.1 GiB for Llama-3-8B on an H200).
        torch.cuda.empty_cache()


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, param)
