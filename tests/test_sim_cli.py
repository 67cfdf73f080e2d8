"""`alignedserve sim` end to end on a small workload: both policies run the same requests,
every output token is accounted for, and the JSON/table carry the side-by-side ratios."""

from __future__ import annotations

import json

import pytest

from alignedserve.batcher.sim.cli import parse_overrides
from alignedserve.batcher.sim.cost_model import LLAMA3_8B, OPT_13B, CostModel, GpuSpec
from alignedserve.batcher.sim.simulator import configs_for, simulate
from alignedserve.batcher.sim.workload import WORKLOADS, paper_mix
from alignedserve.cli import main


def test_sim_command_prints_both_policies_and_ratios(tmp_path, capsys):
    out = tmp_path / "sim.json"
    argv = ["sim", "--num-requests", "60", "--model-shape", "llama3-8b", "--rate", "5"]
    assert main([*argv, "--cost-model", "padded", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "aligned/fcfs throughput" in printed
    results = json.loads(out.read_text())
    assert {r["policy"] for r in results} == {"aligned", "fcfs"}
    assert len({r["output_tokens"] for r in results}) == 1  # same work for both
    assert all(r["throughput_tok_s"] > 0 and r["tpot_p99_s"] >= r["tpot_p50_s"] for r in results)


@pytest.mark.parametrize("bad", ["aligned.nope=1", "gpu.starvation_s=1", "aligned.starvation_s"])
def test_bad_override_is_a_clean_error(bad, capsys):
    assert main(["sim", "--num-requests", "10", "--set", bad]) == 1
    assert "expected aligned|fcfs.FIELD=VALUE" in capsys.readouterr().err


def test_override_reaches_the_policy():
    cost = CostModel(LLAMA3_8B)
    configs = configs_for(cost, 100 * 2**30, aligned={"starvation_s": 0.25})
    assert configs["aligned"].starvation_s == 0.25
    assert configs["fcfs"].starvation_s != 0.25


@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_pairs_split_the_work_and_lose_nothing(policy):
    requests = paper_mix(80, 0.9, seed=3, rate_per_s=20.0, max_output_tokens=64)
    cost = CostModel(LLAMA3_8B)
    config = configs_for(cost, 100 * 2**30)[policy]
    one = simulate(requests, config, cost, num_pairs=1)
    four = simulate(requests, config, cost, num_pairs=4)
    total = sum(r.output_tokens for r in requests)
    assert one.output_tokens == four.output_tokens == total
    assert four.makespan_s <= one.makespan_s * 1.05


def test_write_backs_lengthen_the_step_of_the_gpu_that_writes_them():
    """With role switching, residents move between the lanes through the pool: each writes
    back the KV it decoded since its load, behind its GPU's pass. A slow device-to-host link
    then stretches the run; without role switching nothing is written back mid-run here."""
    requests = paper_mix(80, 0.9, seed=3, max_output_tokens=256)

    def makespan(d2h_bytes_per_s: float, switching: bool) -> float:
        cost = CostModel(LLAMA3_8B, GpuSpec(pcie_d2h_bytes_per_s=d2h_bytes_per_s))
        blocks = {"num_prefill_decode_blocks": 20000 if switching else 0}
        config = configs_for(cost, 100 * 2**30, aligned=blocks)["aligned"]
        return simulate(requests, config, cost).makespan_s

    assert makespan(1e8, switching=True) > 1.15 * makespan(55.4e9, switching=True)
    assert makespan(1e8, switching=False) == pytest.approx(makespan(55.4e9, switching=False))


@pytest.mark.parametrize("prefill_device", [True, False])
def test_loads_take_the_links_the_worker_loads_over(prefill_device, monkeypatch):
    """Onto the decode GPU with a prefetch GPU beside it: both PCIe links. Onto the prefill
    GPU's own residents (role switching), or a GPU alone: that GPU's one link."""
    requests = paper_mix(80, 0.9, seed=3, max_output_tokens=256)
    cost = CostModel(LLAMA3_8B)
    settings = (
        {"num_prefill_decode_blocks": 20000}
        if prefill_device
        else {"num_prefill_device_blocks": 0, "gpu_kv_tokens": 8192}  # small: loads happen
    )
    config = configs_for(cost, 100 * 2**30, aligned=settings)["aligned"]
    taken = []  # the links of every load
    h2d_s = CostModel.h2d_s

    def recorded(self, num_bytes, links=1):
        if num_bytes:
            taken.append(links)
        return h2d_s(self, num_bytes, links)

    monkeypatch.setattr(CostModel, "h2d_s", recorded)
    simulate(requests, config, cost)
    assert set(taken) == ({1, 2} if prefill_device else {1}), sorted(set(taken))


def test_the_decode_gpu_waiting_for_the_prefill_devices_pass_is_counted():
    """A step's answer waits for both devices' passes: with role switching the decode GPU
    waits whenever the prefill device's pass is the longer, and the summary says how much
    of the step time that was. Without a prefill lane it never waits for it."""
    requests = WORKLOADS["paper-90"](40, 0, None)
    cost = CostModel(OPT_13B, padded=False)
    waits = []
    for blocks in (0, 7208):
        config = configs_for(cost, 160 * 2**30, aligned={"num_prefill_decode_blocks": blocks})
        waits.append(simulate(requests, config["aligned"], cost, check=True).lane_wait_fraction)
    assert waits[0] == 0.0
    assert 0.0 < waits[1] < 0.5


def test_a_bool_override_takes_true_or_false(capsys):
    assert parse_overrides(["aligned.prefill_whole_prompts=false"]) == {
        "aligned": {"prefill_whole_prompts": False},
        "fcfs": {},
    }
    assert main(["sim", "--num-requests", "10", "--set", "aligned.prefill_whole_prompts=0"]) == 1
    assert "prefill_whole_prompts is true or false" in capsys.readouterr().err


def test_text_and_number_overrides_are_checked(capsys):
    assert parse_overrides(["aligned.load_order=shortest-first"])["aligned"] == {
        "load_order": "shortest-first"
    }
    assert main(["sim", "--num-requests", "10", "--set", "aligned.load_order=bogus"]) == 1
    assert "load_order='bogus' not one of" in capsys.readouterr().err
    assert main(["sim", "--num-requests", "10", "--set", "aligned.starvation_s=soon"]) == 1
    assert "starvation_s is float" in capsys.readouterr().err
    assert main(["sim", "--num-requests", "10", "--set", "aligned.policy=fcfs"]) == 1
    assert "policy is not one to set" in capsys.readouterr().err
