"""`alignedserve generate`: run prompts through the runtime without a server."""

from __future__ import annotations

import argparse
import tempfile
import time

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.tiny import init_tiny


def run_generate(args: argparse.Namespace) -> int:
    # Validate the request before spending time on loading a model.
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="alignedserve-tiny-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = init_tiny(tmp, arch="llama")
            print("no --model given: using a tiny random-weight model, so the text is noise")
        runtime = LocalRuntime.from_dir(model_dir, device=args.device)
        tok = runtime.tokenizer
        texts = args.prompt
        if args.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        prompts = [tok.encode(t, add_special_tokens=not args.chat) for t in texts]
        start = time.perf_counter()
        gens = runtime.generate(prompts, [params] * len(prompts))
        elapsed = time.perf_counter() - start
    for text, g in zip(args.prompt, gens, strict=True):
        print(f"--- prompt: {text!r}")
        text_out = tok.decode(g.token_ids)
        print(f"    output ({len(g.token_ids)} tokens, {g.finish_reason}): {text_out!r}")
    total = sum(len(g.token_ids) for g in gens)
    print(f"{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s) on {args.device}")
    return 0
