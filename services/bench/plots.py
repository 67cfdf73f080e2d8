"""PNG plots of a benchmark, when matplotlib is installed: the TPOT CDF and the ITL histogram
of each run, and output throughput against the offered rate for a rate sweep."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignedserve.bench.metrics import itls_s, tpot_s
from alignedserve.bench.report import BenchRun
from alignedserve.bench.shapes import Poisson, describe

log = logging.getLogger(__name__)

ITL_BINS = 50
DPI = 120


def _tpots_ms(b: BenchRun) -> list[float]:
    tpots = (tpot_s(r) for r in b.run.records if r.is_ok)
    return [1e3 * t for t in tpots if t is not None]


def _itls_ms(b: BenchRun) -> list[float]:
    return [1e3 * t for r in b.run.records if r.is_ok for t in itls_s(r)]


def write_plots(out_dir: Path, runs: Sequence[BenchRun]) -> list[Path]:
    """The PNGs written; none, with a note, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: servers and CI have no display
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []

    def save(figure, name: str) -> None:
        figure.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
        plt.close(figure)
        written.append(out_dir / name)

    figure, axes = plt.subplots()
    for b in runs:
        if tpots_ms := _tpots_ms(b):
            axes.ecdf(tpots_ms, label=describe(b.shape))
    axes.set(xlabel="TPOT (ms)", ylabel="fraction of requests", title="TPOT CDF")
    axes.legend()
    save(figure, "tpot_cdf.png")

    figure, axes = plt.subplots()
    itls_ms = {describe(b.shape): values for b in runs if (values := _itls_ms(b))}
    # One set of bins for every run, so that their histograms compare bar for bar.
    bins = np.histogram_bin_edges([t for values in itls_ms.values() for t in values], ITL_BINS)
    for label, values in itls_ms.items():
        axes.hist(values, bins=bins, histtype="step", label=label)
    axes.set(xlabel="ITL (ms)", ylabel="gaps", title="Inter-token latency")
    axes.legend()
    save(figure, "itl_hist.png")

    sweep = [(b.shape.rate_per_s, b.summary) for b in runs if isinstance(b.shape, Poisson)]
    if len(sweep) > 1:
        figure, axes = plt.subplots()
        rates, summaries = zip(*sweep, strict=True)
        axes.plot(rates, [s.output_tokens_per_s for s in summaries], marker="o")
        axes.set(xlabel="offered rate (req/s)", ylabel="output tok/s", title="Throughput")
        save(figure, "throughput_vs_rate.png")
    return written
