"""The committed generated code is what protos/generate.py makes now (CI's regenerate-and-
diff), and each protobuf conversion in common/wire.py round-trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alignedserve.common import wire
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=7, temperature=0.7, top_p=0.93, top_k=40, seed=0),
        SamplingParams(seed=2**63 - 1, stop_token_ids=(1, 2, 3), ignore_eos=True, logprobs=True),
        SamplingParams(temperature=0.0),
        SamplingParams(max_tokens=4096, is_default_max_tokens=True),
        SamplingParams(min_p=0.05, logit_bias=((3, -100.0), (17, 2.5), (50000, 100.0))),
    ],
)
def test_sampling_params_round_trip(params):
    assert wire.sampling_from_proto(wire.sampling_to_proto(params)) == params


def test_kv_layout_round_trip():
    layout = KVLayout(
        num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="bfloat16"
    )
    assert wire.layout_from_proto(wire.layout_to_proto(layout)) == layout


def test_invalid_params_from_the_wire_are_rejected_by_name():
    from alignedserve.common.errors import InvalidRequestError

    msg = wire.sampling_to_proto(SamplingParams())
    msg.top_p = 0.0
    with pytest.raises(InvalidRequestError) as e:
        wire.sampling_from_proto(msg)
    assert e.value.param == "top_p"
