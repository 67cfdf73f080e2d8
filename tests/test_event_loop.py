"""Which event loop the services run on (common/event_loop.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import pytest

from alignedserve.common import event_loop
from alignedserve.common.errors import ConfigError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_auto_is_uvloop_where_installed_and_asyncio_keeps_the_standard_loop():
    pytest.importorskip("uvloop")
    assert event_loop.run(_loop_module()) == "uvloop"
    assert event_loop.run(_loop_module(), "uvloop") == "uvloop"
    assert event_loop.run(_loop_module(), "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert event_loop.run(_loop_module(), "auto") == "asyncio"
    with pytest.raises(ConfigError, match="not installed"):
        event_loop.loop_factory("uvloop")


def test_an_unknown_loop_is_refused():
    with pytest.raises(ConfigError, match="not one of"):
        event_loop.loop_factory("trio")


@pytest.mark.parametrize(("field", "value"), [("http_parser", "fast"), ("event_loop", "trio")])
def test_the_router_refuses_unknown_stacks(field, value):
    from alignedserve.router.config import RouterConfig

    with pytest.raises(ConfigError, match=field):
        RouterConfig(model_dir="m", batcher_addresses=("a:1",), **{field: value})


def test_the_batcher_refuses_an_unknown_loop_and_passes_its_choice_on():
    from alignedserve.batcher.service import BatcherConfig, add_batcher_arguments, config_from_args
    from alignedserve.serve import batcher_args

    with pytest.raises(ConfigError, match="event_loop"):
        BatcherConfig(event_loop="trio")
    parser = argparse.ArgumentParser()
    add_batcher_arguments(parser)
    config = BatcherConfig(event_loop="asyncio")
    assert config_from_args(parser.parse_args(batcher_args(config))) == config
