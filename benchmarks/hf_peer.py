"""The peer for issue 6: Hugging Face transformers' continuous batching on the same
checkpoint and the same requests as `alignedserve bench`'s offline run.

    python3 benchmarks/hf_peer.py --model DIR --workload paper-90 --num-requests 64 --out peer.json

The requests are the bench's own (`make_requests` with the same workload, count and seed, run
index 0: the offline run that `gpu_e2e.py` sends first), so both systems prefill the same
prompts and generate the same number of tokens. The model is loaded by transformers from the
checkpoint directory in bf16 with SDPA attention, greedy, EOS ignored.

`generate_batch` takes one `max_new_tokens` for every request, while the workload gives each
request its own output length. So this drives the manager that `generate_batch` itself runs
(`continuous_batching_context_manager`, then `add_request` per request with its own
`max_new_tokens` and no EOS id): the same scheduler, cache and kernels, the same defaults.
The clock runs from the first request added to the last one finished; loading and the
manager's warm-up are timed apart.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from device_env import import_alignedserve

import_alignedserve()
from alignedserve.bench.workload import BenchRequest, make_requests  # noqa: E402

NO_EOS = -1  # transformers' continuous batching: an eos id below 0 is none


@dataclass(frozen=True)
class PeerResult:
    transformers: str
    torch: str
    device_name: str
    attn_implementation: str
    workload: str
    num_requests: int
    num_finished: int
    num_full_length: int  # requests that generated exactly their max_tokens (EOS ignored)
    prompt_tokens: int
    generated_tokens: int
    expected_tokens: int
    load_s: float
    warmup_s: float
    wall_s: float  # first request added to last request finished
    output_tokens_per_s: float
    total_tokens_per_s: float
    timed_out: bool


def vocab_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def peer_requests(model_dir: Path, workload: str, num_requests: int, seed: int):
    """The offline run's requests, exactly as `alignedserve bench` makes them."""
    return make_requests(workload, num_requests, seed, None, vocab_size(model_dir), run_index=0)


def run_peer(
    model_dir: Path,
    requests: list[BenchRequest],
    device: str,
    dtype: str,
    attn: str,
    timeout_s: float,
    workload: str,
) -> PeerResult:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    start = time.perf_counter()
    # no device_map: that needs accelerate, which the GPU images lack
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn
    )
    model = model.to(device).eval()
    load_s = time.perf_counter() - start
    generation = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in requests),
        do_sample=False,  # the bench asks for temperature 0
        eos_token_id=NO_EOS,
        pad_token_id=0,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
        max_generated_length=max(r.max_tokens for r in requests),
        num_requests=len(requests),
    )
    results = {}
    start = time.perf_counter()
    with (
        torch.no_grad(),
        model.continuous_batching_context_manager(
            generation_config=generation, block=True, timeout=30, workload_hints=hints
        ) as manager,
    ):
        warmup_s = time.perf_counter() - start
        begin = time.perf_counter()
        deadline = begin + timeout_s
        for r in requests:
            manager.add_request(
                list(r.prompt_token_ids),
                request_id=r.request_id,
                max_new_tokens=r.max_tokens,
                eos_token_id=NO_EOS,
            )
        while len(results) < len(requests) and time.perf_counter() < deadline:
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = out
            elif out is None and not manager.is_running():
                break  # the manager's thread died: what finished is what there is
        wall_s = time.perf_counter() - begin
    by_id = {r.request_id: r for r in requests}
    done = [(by_id[i], out) for i, out in results.items() if out.error is None]
    generated = sum(len(out.generated_tokens) for _, out in done)
    prompt = sum(len(r.prompt_token_ids) for r, _ in done)
    return PeerResult(
        transformers=transformers.__version__,
        torch=torch.__version__,
        device_name=torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        attn_implementation=attn,
        workload=workload,
        num_requests=len(requests),
        num_finished=len(done),
        num_full_length=sum(len(out.generated_tokens) == r.max_tokens for r, out in done),
        prompt_tokens=prompt,
        generated_tokens=generated,
        expected_tokens=sum(r.max_tokens for r in requests),
        load_s=load_s,
        warmup_s=warmup_s,
        wall_s=wall_s,
        output_tokens_per_s=generated / wall_s,
        total_tokens_per_s=(generated + prompt) / wall_s,
        timed_out=len(results) < len(requests),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    parser.add_argument("--workload", default="paper-90")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args()
    model_dir = Path(args.model)
    requests = peer_requests(model_dir, args.workload, args.num_requests, args.seed)
    result = run_peer(
        model_dir, requests, args.device, args.dtype, args.attn, args.timeout_s, args.workload
    )
    print(
        f"transformers {result.transformers} continuous batching ({result.attn_implementation}): "
        f"{result.num_finished}/{result.num_requests} requests, "
        f"{result.generated_tokens}/{result.expected_tokens} tokens in {result.wall_s:.1f} s: "
        f"{result.output_tokens_per_s:.0f} generated tok/s, "
        f"{result.total_tokens_per_s:.0f} total tok/s "
        f"(load {result.load_s:.0f} s, warm-up {result.warmup_s:.0f} s)",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
