"""Fusing q/k/v and gate/up into single GEMMs (what the loader does on GPUs) changes no logit."""

from __future__ import annotations

import pytest

from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.loader import fuse_projections
from alignedserve.worker.runner import SeqChunk

from factories import ARCHS, random_prompts, save_hf_model
from triton_cpu import HAS_CUDA  # the fused MLP's Triton kernel runs in the interpreter on CPU

# The runtime here is on the CPU, whose tensors Triton runs only in its interpreter, which
# triton_cpu turns on where there is no GPU; on a GPU the batcher service's tests cover this.
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU runtime: Triton's interpreter only")


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_give_the_same_logits(arch, tmp_path):
    save_hf_model(arch, tmp_path)
    runtime = LocalRuntime.from_dir(tmp_path, load_tokenizer=False, block_tokens=4, num_blocks=64)
    (prompt,) = random_prompts((13,), seed=1)
    table = tuple(runtime.allocator.allocate(4))
    chunk = [SeqChunk("a", tuple(prompt), 0, table, None)]
    before = runtime.runner.forward(chunk, all_logits=True)
    fuse_projections(runtime.runner.model)
    names = [n for n, _ in runtime.runner.model.named_parameters()]
    assert any("qkv_proj" in n for n in names) and not any(".q_proj" in n for n in names)
    after = runtime.runner.forward(chunk, all_logits=True)
    assert (before - after).abs().max().item() <= 1e-5
