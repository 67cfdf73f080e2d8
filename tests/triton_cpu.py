"""Triton kernels under test: compiled on a GPU, in Triton's interpreter on CPU tensors
otherwise. Import this before triton or any kernel module: the interpreter must be chosen
before a @triton.jit function is defined."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def _interpreter_patched(name: str, replace) -> Iterator[None]:
    """Triton's interpreter with its attribute `name` replaced by `replace(original)` while
    in the block (on a GPU, where kernels are compiled, this does nothing)."""
    if HAS_CUDA:
        yield
        return
    from triton.runtime import interpreter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, name, replace(getattr(interpreter, name)))
        yield


def bf16_rounded_to_nearest() -> contextlib.AbstractContextManager[None]:
    """triton 3.6's interpreter casts fp32 -> bf16 by truncating the mantissa; GPUs round to
    nearest even, as torch does. Kernels that round to bf16 where eager torch does would then
    be off by up to an ulp per rounding. Patch that one conversion (to torch's) while in the
    block; compiled kernels are untouched."""

    def replace(original):
        def convert(data, src, dst, rounding_mode):
            if src == triton.language.float32 and dst == triton.language.bfloat16:
                rounded = torch.from_numpy(data.astype("float32")).to(torch.bfloat16)
                return rounded.view(torch.int16).numpy().view("uint16")
            return original(data, src, dst, rounding_mode)

        return convert

    return _interpreter_patched("_convert_float", replace)


def scalar_loop_bounds() -> contextlib.AbstractContextManager[None]:
    """triton 3.6's interpreter turns a loop bound into int(shape-(1,) array), which numpy >=
    2.4 refuses (triton-lang/triton#9171); a kernel's `range(lo, hi)` over loaded values hits
    it. Patch that one conversion while in the block."""

    def replace(original):
        def patch(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        return patch

    return _interpreter_patched("_patch_lang_tensor", replace)


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0):
    """Seeded normal values (drawn on the CPU, so equal on every machine) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)
