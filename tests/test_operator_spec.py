"""The operator's typed spec against the CRD: same defaults, same validation, the examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from alignedserve.operator.spec import AlignedServeSpec, SpecError, camel, parse

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "helm/alignedserve/crds/alignedserve.io_alignedserves.yaml"
EXAMPLES = ROOT / "helm/examples"


def crd_spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _walk(cls: type, schema: dict, path: str):
    """(path, dataclass default, CRD default) for every leaf field, and unmatched names."""
    props = schema["properties"]
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}
    assert set(props) == set(fields), f"{path or 'spec'}: CRD {sorted(props)} vs {sorted(fields)}"
    for key, f in fields.items():
        sub = props[key]
        kind = f.type if isinstance(f.type, type) else None
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if dataclasses.is_dataclass(default) or (
            sub.get("type") == "object" and "properties" in sub
        ):
            nested = type(default) if default is not None else _field_class(cls, f.name)
            yield from _walk(nested, sub, f"{path}.{key}" if path else key)
        else:
            yield (f"{path}.{key}" if path else key), default, sub.get("default", kind)


def test_enums_equal_the_crds():
    """Each field the operator checks against a list: the CRD's enum is that list (and the
    policies are the batcher's own, common/policy.py)."""
    from alignedserve.common.policy import LOAD_ORDERS, POLICIES
    from alignedserve.operator.spec import _ENUMS

    assert _ENUMS["batching.policy"] == POLICIES
    assert _ENUMS["batching.loadOrder"] == LOAD_ORDERS
    for where, allowed in _ENUMS.items():
        node = crd_spec_schema()
        for part in where.split("."):
            node = node["properties"][part]
        assert node["enum"] == list(allowed), where


def _field_class(cls: type, name: str) -> type:
    import typing

    return typing.get_type_hints(cls)[name]


def test_defaults_equal_the_crds():
    leaves = list(_walk(AlignedServeSpec, crd_spec_schema(), ""))
    assert len(leaves) > 30
    for path, ours, theirs in leaves:
        if path == "model.path":  # required, no default on either side
            continue
        if isinstance(ours, tuple):
            ours = list(ours)
        assert ours == theirs, f"{path}: operator default {ours!r} != CRD default {theirs!r}"


def _examples(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml"))


@pytest.mark.parametrize("path", _examples(EXAMPLES), ids=lambda p: p.stem)
def test_good_examples_parse(path):
    obj = yaml.safe_load(path.read_text())
    spec = parse(obj["spec"], obj["metadata"]["name"])
    assert spec.served_name  # defaulted to the resource's name when unset


@pytest.mark.parametrize("path", _examples(EXAMPLES / "bad"), ids=lambda p: p.stem)
def test_bad_examples_are_refused_with_the_field_named(path):
    obj = yaml.safe_load(path.read_text())
    with pytest.raises(SpecError) as e:
        parse(obj.get("spec") or {}, obj["metadata"]["name"])
    assert any(word in str(e.value) for word in ("model", "workers", "router", "batching", "auto"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"model": {"path": "/m", "source": "pvc"}}, "pvcName is required"),
        ({"model": {"path": "/m", "source": "hostPath"}}, "hostPath is required"),
        (
            {
                "model": {"path": "/m"},
                "autoscaling": {"enabled": True, "workers": {"minReplicas": 0}},
            },
            "only with autoscaling.scaleToZero",
        ),
        (
            {
                "model": {"path": "/m"},
                "autoscaling": {"routers": {"minReplicas": 5, "maxReplicas": 2}},
            },
            "must not exceed maxReplicas",
        ),
        (  # the CRD's minimum: the autoscaler's bounds would refuse it on every tick
            {
                "model": {"path": "/m"},
                "autoscaling": {
                    "enabled": True,
                    "scaleToZero": True,
                    "workers": {"minReplicas": 0, "maxReplicas": 0},
                },
            },
            "autoscaling.workers.maxReplicas must be >= 1",
        ),
        ({"model": {"path": "/m"}, "drainSeconds": 1.5}, "drainSeconds=1.5 must be of type int"),
        ({"model": {"path": "/m"}, "workers": {"replicas": True}}, "must be of type int"),
        (
            {"model": {"path": "/m"}, "batching": {"maxStepsInFlight": 0}},
            "batching.maxStepsInFlight must be >= 1",
        ),
        ({"model": {"path": "/m"}, "workers": {"warmUpBatch": -1}}, "warmUpBatch must be >= 0"),
        (
            {"model": {"path": "/m"}, "workers": {"overlapSteps": "false"}},
            "workers.overlapSteps='false' must be of type bool",
        ),
        (
            {"model": {"path": "/m"}, "batching": {"loadOrder": "random"}},
            "batching.loadOrder='random' not one of",
        ),
        (
            {"model": {"path": "/m"}, "batching": {"prefillWholePrompts": "false"}},
            "batching.prefillWholePrompts='false' must be of type bool",
        ),
        ({"model": "/m"}, "model: expected an object"),
        # the services' own bounds: the router refuses a zero drain, the batcher a group
        # minimum above its largest group (SchedulerConfig.max_batch_size)
        ({"model": {"path": "/m"}, "drainSeconds": 0}, "drainSeconds must be in 1..3600"),
        (
            {"model": {"path": "/m"}, "batching": {"minBatch": 513}},
            "batching.minBatch must be in 1..512",
        ),
    ],
)
def test_cross_field_rules(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec, "x")


def test_scale_to_zero_allows_zero_workers():
    spec = {
        "model": {"path": "/m"},
        "autoscaling": {"enabled": True, "scaleToZero": True, "workers": {"minReplicas": 0}},
    }
    assert parse(spec, "x").autoscaling.workers.min_replicas == 0


def test_the_group_minimum_bound_is_the_batchers_largest_group():
    from alignedserve.batcher.scheduler import SchedulerConfig

    largest = SchedulerConfig().max_batch_size
    spec = {"model": {"path": "/m"}, "batching": {"minBatch": largest}}
    assert parse(spec, "x").batching.min_batch == largest
    with pytest.raises(SpecError):
        parse({"model": {"path": "/m"}, "batching": {"minBatch": largest + 1}}, "x")
