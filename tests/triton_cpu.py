"""Triton kernels under test: compiled on a GPU, in Triton's interpreter on CPU tensors
otherwise. Import this before triton or any kernel module: the interpreter must be chosen
before a @triton.jit function is defined."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip(
    "triton",
    reason="triton is not installed (the worker's GPU kernels need it; pip install triton)",
)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402


def kernel_module(name: str, kernel: str) -> ModuleType:
    """Import a kernel module by path (packages may re-export functions under the module's
    name); re-import it if another test imported it before the interpreter was chosen."""
    module = importlib.import_module(name)
    if not HAS_CUDA and not isinstance(getattr(module, kernel), InterpretedFunction):
        module = importlib.reload(module)
    return module


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0):
    """Seeded normal values (drawn on the CPU, so equal on every machine) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)
