"""Flags generated from a config dataclass, and the command line that parses back to a config."""

from __future__ import annotations

import argparse

from alignedserve.common import flags
from alignedserve.operator.main import OperatorArgs


def parse(argv: list[str]) -> OperatorArgs:
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, OperatorArgs)
    return flags.from_args(OperatorArgs, parser.parse_args(argv))


def test_to_args_parses_back_with_bools_tuples_and_numbers():
    config = OperatorArgs(
        namespace=("a", "b"), standalone=True, interval_s=2.5, metrics_port=0, log_format="json"
    )
    argv = flags.to_args(config)
    assert "--standalone" in argv and "--metrics-port" in argv
    assert parse(argv) == config
    everywhere = OperatorArgs(all_namespaces=True)
    assert parse(flags.to_args(everywhere)) == everywhere
