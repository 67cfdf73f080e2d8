"""Fusing q/k/v and gate/up into single GEMMs and folding the RMSNorm gains into them (what
the loader does on GPUs) changes no logit; nor does the Llama layer's fused small step."""

from __future__ import annotations

import weakref

import pytest
import torch

from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.loader import fuse_projections
from alignedserve.worker.models import llama
from alignedserve.worker.models.layers import RMSNorm
from alignedserve.worker.runner import SeqChunk

from factories import ARCHS, random_prompts, record_skinny_layers, save_hf_model
from triton_cpu import HAS_CUDA  # the fused MLP's Triton kernel runs in the interpreter on CPU

# The runtime here is on the CPU, whose tensors Triton runs only in its interpreter, which
# triton_cpu turns on where there is no GPU; on a GPU the batcher service's tests cover this.
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU runtime: Triton's interpreter only")


def runtime_with_gains(arch, path) -> LocalRuntime:
    """A tiny model whose RMSNorm gains are not 1 (transformers initialises them to 1, which
    would make folding them a no-op)."""
    save_hf_model(arch, path)
    runtime = LocalRuntime.from_dir(path, load_tokenizer=False, block_tokens=4, num_blocks=64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in runtime.runner.model.modules():
            if isinstance(module, RMSNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return runtime


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_give_the_same_logits(arch, tmp_path):
    runtime = runtime_with_gains(arch, tmp_path)
    layers = [m for m in runtime.runner.model.modules() if isinstance(m, llama.LlamaDecoderLayer)]
    gains = [layer.input_layernorm.weight.clone() for layer in layers]
    (prompt,) = random_prompts((13,), seed=1)
    table = tuple(runtime.allocator.allocate(4))
    chunk = [SeqChunk("a", tuple(prompt), 0, table, None)]
    before = runtime.runner.forward(chunk, all_logits=True)
    fuse_projections(runtime.runner.model)
    names = [n for n, _ in runtime.runner.model.named_parameters()]
    assert any("qkv_proj" in n for n in names) and not any(".q_proj" in n for n in names)
    after = runtime.runner.forward(chunk, all_logits=True)
    assert (before - after).abs().max().item() <= 1e-5
    if gains:  # the Llama family: the gains now live in the fused weights, the norms are 1
        assert not torch.equal(gains[0], torch.ones_like(gains[0]))
        for layer in layers:
            assert layer.norms_folded
            assert torch.equal(layer.input_layernorm.weight, torch.ones_like(gains[0]))
            assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(gains[0]))


@pytest.mark.parametrize("layers", [(0, 1), (0,), (1,)])
@pytest.mark.parametrize("arch", [a for a in ARCHS if not a.startswith("opt")])
def test_the_skinny_layer_gives_the_same_logits(arch, layers, tmp_path, monkeypatch):
    """The Llama layer's fused small step (norms, SiLU * up and residual adds inside its four
    GEMMs) against the layer of separate ops, in the interpreter: a prefill chunk and then a
    decode step over the cache it wrote. qwen2 has a qkv bias, qwen3 q/k norms. With one
    of the two layers fused, the residual stream crosses between the forms either way."""
    runtime = runtime_with_gains(arch, tmp_path)
    fuse_projections(runtime.runner.model)
    (prompt,) = random_prompts((13,), seed=2)
    tables = {name: tuple(runtime.allocator.allocate(4)) for name in ("plain", "skinny")}

    def steps(name):
        prefill = runtime.runner.forward([SeqChunk(name, tuple(prompt), 0, tables[name], None)])
        token = int(prefill[0].argmax())
        decode = runtime.runner.forward([SeqChunk(name, (token,), 13, tables[name], None)])
        return prefill, decode

    plain = steps("plain")
    num_layers = len(runtime.runner.model.model.layers)
    calls = iter(range(10**6))  # the layers ask in order, once per forward each
    monkeypatch.setattr(llama, "takes_skinny", lambda x: next(calls) % num_layers in layers)
    taken = record_skinny_layers(monkeypatch)
    skinny = steps("skinny")
    assert taken == list(layers) * 2
    for want, got in zip(plain, skinny, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_unfused_weights_are_freed_before_the_cache_is_emptied(tmp_path, monkeypatch):
    """On a GPU, fuse_projections ends by giving torch's cached memory back. The unfused q/k/v
    and gate/up weights must be gone by then, or their memory stays reserved (8.5 GiB for
    Llama-3-8B): the loop once listed every module first and so kept them alive."""
    model = runtime_with_gains("llama", tmp_path).runner.model
    unfused = [
        weakref.ref(getattr(m, name).weight)
        for m in model.modules()
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        if hasattr(m, name)
    ]
    alive_at_release = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "empty_cache",
        lambda: alive_at_release.append(sum(r() is not None for r in unfused)),
    )
    fuse_projections(model)
    assert len(unfused) == 5 * 2 and alive_at_release == [0]
