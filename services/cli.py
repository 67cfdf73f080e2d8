"""`alignedserve` command line. Parsing imports nothing heavy; each command imports what it
needs after the arguments are read, so `--help` and torch-free services start fast."""

from __future__ import annotations

import argparse
import logging
import re
import sys

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt")


def _torch_device(value: str) -> str:
    """cpu, cuda or cuda:N, checked without importing torch."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", value) is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu, cuda or cuda:N")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignedserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities").add_subparsers(
        dest="model_command", required=True
    )
    tiny = model.add_parser("init-tiny", help="write a small random-weight model + tokenizer")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--arch", choices=TINY_ARCHS, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    tiny.add_argument(
        "--device",
        type=_torch_device,
        default="cpu",
        help="draw the weights here, e.g. cuda:0 (fast for full-size shapes); the same seed "
        "gives the same weights on the same kind of device, CPU and CUDA differ",
    )

    gen = sub.add_parser("generate", help="generate from prompts with the runtime, no server")
    gen.add_argument("--model", help="model directory (default: a tiny model made on the spot)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--device", default="cpu")

    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API (default: router + batcher + worker here)",
        description="With no role: the router in this process (or --num-routers router "
        "processes on one port), the batcher and the worker in supervised child processes, "
        "over loopback gRPC. A role runs that one service (as a pod does).",
    )
    from alignedserve.serve import add_serve_arguments  # each of these imports no torch

    add_serve_arguments(serve)
    roles = serve.add_subparsers(dest="role")
    from alignedserve.batcher.service import add_batcher_arguments
    from alignedserve.router.config import add_router_arguments
    from alignedserve.worker.service import add_worker_arguments

    add_router_arguments(roles.add_parser("router", help="the HTTP front door alone"))
    add_batcher_arguments(roles.add_parser("batcher", help="the batcher alone"))
    add_worker_arguments(roles.add_parser("worker", help="the model worker alone"))

    sim = sub.add_parser("sim", help="simulate aligned vs fcfs scheduling on GPU pairs")
    from alignedserve.batcher.sim.cli import add_arguments  # no torch: cheap to import

    add_arguments(sim)

    bench = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server or the in-process engine: throughput, "
        "TTFT, TPOT, ITL",
    )
    from alignedserve.bench.cli import add_arguments as add_bench_arguments  # no torch, no HTTP

    add_bench_arguments(bench)

    op = sub.add_parser("operator", help="run the Kubernetes operator for AlignedServe resources")
    from alignedserve.operator.main import add_operator_arguments  # kopf loads only when run

    add_operator_arguments(op)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from alignedserve.common.errors import AlignedServeError

    try:
        return _run(args)
    except AlignedServeError as e:
        print(f"alignedserve: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "model":
        from alignedserve.worker.tiny import init_tiny

        init_tiny(args.dir, arch=args.arch, seed=args.seed, dtype=args.dtype, device=args.device)
        print(f"wrote tiny {args.arch} model to {args.dir}")
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "sim":
        from alignedserve.batcher.sim.cli import run_sim

        return run_sim(args)
    if args.command == "bench":
        from alignedserve.bench.cli import run_bench

        return run_bench(args)
    if args.command == "generate":
        from alignedserve.worker.demo import run_generate

        return run_generate(args)
    if args.command == "operator":
        from alignedserve.operator.main import run_operator

        return run_operator(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    if args.role in ("router", "batcher", "worker"):  # a child of `serve`, or run alone
        from alignedserve.supervisor import follow_parent

        follow_parent()
    if args.role == "router":
        from alignedserve.router.config import config_from_args
        from alignedserve.router.server import run_router

        return run_router(config_from_args(args))
    if args.role == "batcher":
        from alignedserve.batcher.service import config_from_args, run_batcher

        return run_batcher(config_from_args(args))
    if args.role == "worker":
        from alignedserve.worker.server import run_worker
        from alignedserve.worker.service import config_from_args

        return run_worker(config_from_args(args))
    from alignedserve.serve import config_from_args, run_serve

    return run_serve(config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
