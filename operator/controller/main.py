"""`alignedserve operator`: run the kopf operator for AlignedServe resources.

    alignedserve operator --standalone --all-namespaces \
        --liveness http://0.0.0.0:8081/healthz --metrics-port 8080

The chart runs one replica (Recreate) with --standalone: no peering objects, and never two
operators acting on one resource.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

from alignedserve.common import flags
from alignedserve.common.errors import ConfigError
from alignedserve.operator.spec import DEFAULT_IMAGE, DEFAULT_INTERVAL_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorArgs:
    namespace: tuple[str, ...] = field(default=(), metadata={"help": "watch only these namespaces"})
    all_namespaces: bool = field(default=False, metadata={"help": "watch every namespace"})
    standalone: bool = field(default=False, metadata={"help": "no peering with other operators"})
    liveness: str = field(default="", metadata={"help": "kopf's liveness endpoint URL"})
    metrics_port: int = field(default=8080, metadata={"help": "Prometheus /metrics port; 0: off"})
    metrics_host: str = field(default="0.0.0.0", metadata={"help": "address of /metrics"})
    interval_s: float = field(
        default=DEFAULT_INTERVAL_S, metadata={"help": "how often children and load are observed"}
    )
    prometheus_url: str = field(
        default="", metadata={"help": "Prometheus for p99 TPOT autoscaling (optional)"}
    )
    log_format: str = field(
        default="full",
        metadata={"help": "kopf's log lines", "choices": ("plain", "full", "json")},
    )
    default_image: str = field(
        default=os.environ.get("ALIGNEDSERVE_DEFAULT_IMAGE", DEFAULT_IMAGE),
        metadata={"help": "image of AlignedServe pods whose spec names none"},
    )

    def __post_init__(self) -> None:
        if bool(self.namespace) == self.all_namespaces:
            raise ConfigError("give either --namespace NS [NS ...] or --all-namespaces")
        if self.interval_s <= 0:
            raise ConfigError(f"interval_s={self.interval_s} must be > 0")


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, OperatorArgs)


def run_operator(args: argparse.Namespace) -> int:
    config = flags.from_args(OperatorArgs, args)
    # handlers read their settings at import (kopf's timer interval is fixed there)
    os.environ["ALIGNEDSERVE_OPERATOR_INTERVAL_S"] = str(config.interval_s)
    os.environ["ALIGNEDSERVE_PROMETHEUS_URL"] = config.prometheus_url
    os.environ["ALIGNEDSERVE_DEFAULT_IMAGE"] = config.default_image
    import kopf

    from alignedserve.common.metrics import start_metrics_server
    from alignedserve.operator import handlers, metrics

    if handlers.CONFIG.interval_s != config.interval_s:  # imported before the flags were read
        raise ConfigError("alignedserve.operator.handlers was imported before run_operator")
    for handler in list(logging.root.handlers):  # kopf installs its own (text or JSON)
        logging.root.removeHandler(handler)
    kopf.configure(log_format=kopf.LogFormat[config.log_format.upper()])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per probe
    if config.metrics_port:
        start_metrics_server(config.metrics_port, config.metrics_host, metrics.REGISTRY)
    log.info("operator starting (namespaces: %s)", config.namespace or "all")
    kopf.run(
        standalone=config.standalone,
        clusterwide=config.all_namespaces,
        namespaces=list(config.namespace),
        liveness_endpoint=config.liveness or None,
    )
    return 0
