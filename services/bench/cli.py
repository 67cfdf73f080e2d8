"""`alignedserve bench`: one workload against a target (an OpenAI-compatible server, or our
batcher engine in this process), under each load shape asked for (a rate sweep, closed-loop
concurrencies, or offline), then one table."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from alignedserve.bench.engine_target import EngineTargetConfig
from alignedserve.bench.metrics import Slo, summarize
from alignedserve.bench.plots import write_plots
from alignedserve.bench.progress import Progress
from alignedserve.bench.records import Target
from alignedserve.bench.report import BenchRun, markdown_table, write_json, write_markdown
from alignedserve.bench.shapes import Concurrency, LoadShape, Offline, Poisson, describe
from alignedserve.bench.workload import is_workload, make_requests, workload_names
from alignedserve.common import flags
from alignedserve.common.errors import ConfigError, UnavailableError

WARM_UP_MAX_TOKENS = 16
TARGETS = ("openai", "engine")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = DEFAULT_BASE_URL  # with or without /v1
    # openai: the served name, empty: the first of /v1/models; engine: the model directory,
    # empty: a tiny random-weight model
    model: str = ""
    workload: str = "paper-90"
    num_requests: int = 1000  # per run
    seed: int = 0
    # Prompt ids are drawn below it. The default is the smallest common vocabulary (Llama 2,
    # Mistral), so the ids are valid on every usual model.
    vocab_size: int = 32000
    rates: tuple[float, ...] = ()  # req/s, one run each; inf: offline
    concurrencies: tuple[int, ...] = ()  # requests in flight, one run each
    # Offline, the requests in flight at once; for every run, the client's connections.
    # AlignedServe wants a large pool of requests in flight: keep it above the server's.
    max_concurrency: int = 1024
    timeout_s: float = 3600.0  # per run
    # openai target: client processes the requests of each run are dealt among (one streams
    # ~11-14k tokens/s at most: bench/clients.py)
    num_clients: int = 1
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    out: str = ""  # directory for bench.json, bench.md and the PNGs; empty: print only
    engine: EngineTargetConfig | None = None  # None: the OpenAI-compatible server at base_url

    def __post_init__(self) -> None:
        if not is_workload(self.workload):
            raise ConfigError(
                f"workload={self.workload!r}: expected one of {workload_names()} "
                "or fixed-PROMPT-OUTPUT"
            )
        for name in ("num_requests", "max_concurrency", "num_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if not all(rate > 0 for rate in self.rates):  # NaN fails too
            raise ConfigError(f"rates={self.rates}: each must be > 0 (inf: offline)")
        if not all(n >= 1 for n in self.concurrencies):
            raise ConfigError(f"concurrencies={self.concurrencies}: each must be >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s} must be > 0")
        for name in ("slo_ttft_s", "slo_tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be > 0")
        if self.engine is not None and self.base_url != DEFAULT_BASE_URL:
            raise ConfigError(f"base_url={self.base_url!r}: the engine target has no URL")
        if self.engine is not None and self.num_clients != 1:
            raise ConfigError(f"num_clients={self.num_clients}: the engine target runs in-process")
        for n in (self.max_concurrency, *self.concurrencies):
            if n < self.num_clients:
                raise ConfigError(
                    f"{n} requests in flight cannot be shared by num_clients={self.num_clients}"
                )

    def shapes(self) -> list[LoadShape]:
        """The runs, in the order given: rates first, then concurrencies; offline if none."""
        shapes: list[LoadShape] = [
            Offline(self.max_concurrency) if math.isinf(rate) else Poisson(rate)
            for rate in self.rates
        ]
        shapes += [Concurrency(n) for n in self.concurrencies]
        return shapes or [Offline(self.max_concurrency)]

    def slo(self) -> Slo:
        return Slo(ttft_s=self.slo_ttft_s, tpot_s=self.slo_tpot_s)


DEFAULTS = BenchConfig()
ENGINE_DEFAULTS = EngineTargetConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default=TARGETS[0],
        help="openai: the server at --base-url; engine: our batcher engine in this process, "
        "its worker a child process, no router and no HTTP (default %(default)s)",
    )
    parser.add_argument(
        "--base-url", default=d.base_url, help="openai: the server (with or without /v1)"
    )
    parser.add_argument(
        "--model",
        default=d.model,
        help="openai: the served name (default: the first of /v1/models); engine: the model "
        "directory (default: a tiny random-weight model)",
    )
    parser.add_argument(
        "--workload",
        default=d.workload,
        help=f"{', '.join(workload_names())}, or any fixed-PROMPT-OUTPUT (default {d.workload})",
    )
    parser.add_argument("--num-requests", type=int, default=d.num_requests, help="per run")
    parser.add_argument("--seed", type=int, default=d.seed, help="lengths, arrivals and prompts")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=d.vocab_size,
        help="prompt token ids are drawn below it (engine: and below the model's vocabulary), "
        "away from both ends",
    )
    parser.add_argument(
        "--rate",
        dest="rates",
        type=float,
        metavar="REQ_PER_S",
        action="append",
        default=[],
        help="Poisson arrivals at this many requests/s, one run each (repeat for a sweep); "
        "inf: offline. With neither --rate nor --concurrency: one offline run",
    )
    parser.add_argument(
        "--concurrency",
        dest="concurrencies",
        type=int,
        metavar="N",
        action="append",
        default=[],
        help="closed loop with this many requests in flight, one run each (repeat)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=d.max_concurrency,
        help="offline: requests in flight at once; every run: the client's connections",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=d.timeout_s,
        help="stops a run: requests still out are cancelled and counted as failed",
    )
    parser.add_argument(
        "--num-clients",
        type=int,
        default=d.num_clients,
        help="openai: client processes each run's requests are dealt among (one streams "
        "~11-14k tokens/s at most; raise it when the server streams more)",
    )
    parser.add_argument("--slo-ttft-s", type=float, default=d.slo_ttft_s, help="for goodput")
    parser.add_argument("--slo-tpot-s", type=float, default=d.slo_tpot_s, help="for goodput")
    parser.add_argument(
        "--out", default=d.out, help="write bench.json, bench.md and PNG plots to this directory"
    )
    flags.add_arguments(
        parser.add_argument_group("engine target (with --target engine)"), EngineTargetConfig
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    engine = flags.from_args(EngineTargetConfig, args)
    if args.target != "engine":
        given = [
            f"--{f.name.replace('_', '-')}"
            for f in dataclasses.fields(EngineTargetConfig)
            if getattr(engine, f.name) != getattr(ENGINE_DEFAULTS, f.name)
        ]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --target engine")
        engine = None
    names = [f.name for f in dataclasses.fields(BenchConfig) if f.name != "engine"]
    values = {name: getattr(args, name) for name in names}
    return BenchConfig(
        **{**values, "rates": tuple(args.rates), "concurrencies": tuple(args.concurrencies)},
        engine=engine,
    )


async def _warm_up(target: Target, config: BenchConfig, run_index: int) -> None:
    """One short request before the runs, as vLLM's bench sends: the first run does not pay
    the server's first-request costs, and an unusable endpoint fails once, not N times. Its
    prompt (run_index) is one no run sends, so no run finds it in a prefix cache."""
    (request,) = make_requests(config.workload, 1, config.seed, None, config.vocab_size, run_index)
    request = replace(request, max_tokens=min(request.max_tokens, WARM_UP_MAX_TOKENS))
    async with asyncio.timeout(config.timeout_s):
        record = await target.run(request)
    if not record.is_ok:
        # The flag users most often get wrong: the default vocabulary fits usual models only
        # (the engine target knows its model's, and stays below it).
        hint = f" (--vocab-size {config.vocab_size}: is it at most the model's?)"
        hint = hint if config.engine is None else ""
        raise UnavailableError(f"the warm-up request failed: {record.error}{hint}")


@asynccontextmanager
async def open_target(config: BenchConfig) -> AsyncIterator[tuple[Target, BenchConfig, str]]:
    """The target, the config as the runs use it, and the model's name."""
    if config.engine is not None:
        from alignedserve.bench.engine_target import EngineTarget

        async with EngineTarget(config.engine, config.model) as engine:
            # The model is known here: ids it does not have would only fail every request.
            vocab_size = min(config.vocab_size, engine.vocab_size)
            yield engine, replace(config, vocab_size=vocab_size), engine.model_name
        return
    # The HTTP client is imported only to run, so that `alignedserve --help` stays light.
    from alignedserve.bench.targets import OpenAITarget, first_model

    model = config.model or await first_model(config.base_url)
    max_connections = max((config.max_concurrency, *config.concurrencies))
    async with OpenAITarget(config.base_url, model, max_connections) as target:
        yield target, config, model


async def bench(config: BenchConfig) -> tuple[BenchConfig, str, list[BenchRun]]:
    """The config as run (the engine target fits vocab_size to its model), the model
    benchmarked and each run's results, in the order of config.shapes()."""
    from alignedserve.bench.clients import run_load_in_processes
    from alignedserve.bench.runner import run_load

    runs = []
    shapes = config.shapes()
    async with open_target(config) as (target, config, model):
        await _warm_up(target, config, run_index=len(shapes))
        for index, shape in enumerate(shapes):
            rate = shape.rate_per_s if isinstance(shape, Poisson) else None
            requests = make_requests(
                config.workload, config.num_requests, config.seed, rate, config.vocab_size, index
            )
            async with Progress(describe(shape), len(requests)) as progress:
                if config.num_clients > 1:
                    run = await run_load_in_processes(
                        config.base_url,
                        model,
                        requests,
                        shape,
                        config.timeout_s,
                        config.num_clients,
                        progress.advance,
                    )
                else:
                    run = await run_load(
                        target, requests, shape, config.timeout_s, progress.advance
                    )
            runs.append(BenchRun(shape, run, summarize(run, config.slo())))
    return config, model, runs


def _title(config: BenchConfig, model: str) -> str:
    slo = config.slo()
    objectives = [
        f"{name} ≤ {value * 1e3:g} ms"
        for name, value in (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s))
        if value is not None
    ]
    goodput = f"; goodput at {', '.join(objectives)}" if objectives else ""
    where = f"at {config.base_url}" if config.engine is None else f"on {config.engine.describe()}"
    return (
        f"`alignedserve bench`: {config.workload}, {config.num_requests} requests per run, "
        f"model {model} {where}, EOS ignored{goodput}"
    )


def run_bench(args: argparse.Namespace) -> int:
    """Runs every load shape, writes the reports, prints the table; 1 if a request failed."""
    config, model, runs = asyncio.run(bench(config_from_args(args)))
    title = _title(config, model)
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "bench.json", {**dataclasses.asdict(config), "model": model}, runs)
        write_markdown(out / "bench.md", title, runs)
        write_plots(out, runs)
    print(f"{title}\n\n{markdown_table(runs)}", end="")
    num_failed = sum(b.summary.num_failed + b.summary.num_not_sent for b in runs)
    if num_failed:
        print(f"alignedserve bench: {num_failed} requests failed or not sent", file=sys.stderr)
    return 1 if num_failed else 0
