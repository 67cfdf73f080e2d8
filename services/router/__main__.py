"""`python -m alignedserve.router --model-dir DIR --batcher-addresses HOST:PORT ...`"""

from __future__ import annotations

import argparse
import logging
import sys

from alignedserve.common.errors import AlignedServeError
from alignedserve.router.config import add_router_arguments, config_from_args
from alignedserve.router.server import run_router


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignedserve.router", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    add_router_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_router(config_from_args(args))
    except AlignedServeError as e:
        print(f"alignedserve router: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
