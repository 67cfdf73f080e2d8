"""The bounded persistent GEMM (benchmarks/bounded_gemm.py, issue 5's overlap probe) against
its torch twin.

Without a GPU the kernel runs in Triton's interpreter on tiny fp32 shapes; the `gpu` tests add
the Llama-3-8B projections in bf16 at decode batch sizes and bounded program counts.
"""

from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, HAS_CUDA, randn, scalar_loop_bounds  # isort: skip  (first)

from factories import benchmark_module

pl = benchmark_module("bounded_gemm")

SMALL = pl.GemmTiles(block_m=16, block_n=16, block_k=16, num_stages=2, num_warps=4)

# (M, N, K): whole tiles; M, N and K cut mid-tile (TMA reads zeros past the edges and stores
# only inside); a single tile
SHAPES = [(32, 48, 64), (20, 40, 56), (5, 16, 16)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("num_programs", [1, 3, 1000])
def test_matches_the_twin_with_any_number_of_programs(m, n, k, num_programs):
    x, w = randn(m, k, seed=1), randn(n, k, seed=2)
    with scalar_loop_bounds():  # the tile loop's bounds are computed in the kernel
        got = pl.persistent_linear(x, w, num_programs, SMALL)
    torch.testing.assert_close(got, pl.persistent_linear_ref(x, w), rtol=1e-4, atol=1e-4)


def test_every_tile_is_written_once_into_a_given_output():
    # NaN in the output before: a tile left unwritten, or written by two programs with
    # different partial sums, would show
    x, w = randn(20, 32, seed=3), randn(40, 32, seed=4)
    out = torch.full((20, 40), float("nan"), device=DEVICE)
    with scalar_loop_bounds():
        got = pl.persistent_linear(x, w, 2, SMALL, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, pl.persistent_linear_ref(x, w), rtol=1e-4, atol=1e-4)


def test_bad_shapes_and_program_counts_are_refused():
    x, w = randn(4, 16, seed=5), randn(16, 32, seed=6)
    with pytest.raises(ValueError, match="K=16"):
        pl.persistent_linear(x, w, 4, SMALL)
    with pytest.raises(ValueError, match="num_programs"):
        pl.persistent_linear(x, randn(16, 16, seed=7), 0, SMALL)


def test_tiles_are_counted_over_both_output_dimensions():
    assert pl.num_tiles(512, 4096, pl.GemmTiles(block_m=128, block_n=128)) == 4 * 32
    assert pl.num_tiles(130, 100, pl.GemmTiles(block_m=128, block_n=64)) == 2 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("m", [64, 256, 512])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336)])
@pytest.mark.parametrize("num_programs", [32, 132])
def test_gpu_llama_projections_in_bf16(m, n, k, num_programs):
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    tiles = pl.GemmTiles(block_m=64 if m <= 64 else 128)
    got = pl.persistent_linear(x, w, num_programs, tiles)
    want = pl.persistent_linear_ref(x.float(), w.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
