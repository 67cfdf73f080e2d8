"""Triton kernels of the decode fast path, each beside its plain-torch reference twin.

The twins are what the CPU runs and what the kernels are tested against (on a GPU, and on tiny
shapes under `TRITON_INTERPRET=1` on CPU). Importing this package needs triton.
"""

from alignedserve.worker.kernels.decode_attention import decode_attention, decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref"]
