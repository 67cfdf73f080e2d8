"""The `alignedserve` command line, run as a user runs it: `python -m alignedserve ...` in a
subprocess. Each model command starts a fresh interpreter that imports torch, so the model
commands run concurrently in module-scoped fixtures and the tests check their results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignedserve.cli import TINY_ARCHS, build_parser

ROOT = Path(__file__).resolve().parents[1]
HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
}
OUTPUT_LINE = re.compile(r"^ {4}output \((\d+) tokens, (length|stop)\): (.*)$", re.M)
PROMPT_LINE = re.compile(r"^--- prompt: (.*)$", re.M)


def cli(*args: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # one thread each: the fixtures run several interpreters at once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "alignedserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cli-models"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every model command this module checks, run concurrently: "init-ARCH" then
    "generate-ARCH" for each arch, and "chat" and "bad-temperature" on the llama model."""
    base = models_dir(tmp_path_factory)
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    llama_ready = threading.Event()

    def arch_chain(arch: str) -> None:
        model_dir = str(base / arch)
        try:
            results[f"init-{arch}"] = cli("model", "init-tiny", model_dir, "--arch", arch)
        finally:
            if arch == "llama":
                llama_ready.set()
        if results[f"init-{arch}"].returncode == 0:
            gen = ("generate", "--model", model_dir, "--prompt", "a", "--prompt", "bb")
            results[f"generate-{arch}"] = cli(*gen, "--max-tokens", "5")

    def on_llama(name: str, *args: str) -> None:
        llama_ready.wait()
        results[name] = cli("generate", "--model", str(base / "llama"), *args)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = [pool.submit(arch_chain, "llama")]
        futures += [pool.submit(arch_chain, a) for a in TINY_ARCHS if a != "llama"]
        futures.append(
            pool.submit(on_llama, "chat", "--chat", "--prompt", "Hi there", "--max-tokens", "5")
        )
        futures.append(
            pool.submit(on_llama, "bad-temperature", "--prompt", "a", "--temperature", "-1")
        )
        for f in futures:
            f.result()
    return results


def test_archs_cover_the_readme():
    assert set(TINY_ARCHS) == set(ARCHITECTURES)


def test_bench_help_names_both_targets(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per command
    (line,) = [
        s for s in build_parser().format_help().splitlines() if s.strip().startswith("bench")
    ]
    assert "an OpenAI-compatible server or the in-process engine" in line


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_init_tiny_writes_a_hf_model_dir(runs, tmp_path_factory, arch):
    model_dir = models_dir(tmp_path_factory) / arch
    proc = runs[f"init-{arch}"]
    assert proc.returncode == 0, explain(proc)
    assert f"wrote tiny {arch} model to {model_dir}" in proc.stdout
    for name in HF_FILES:
        assert (model_dir / name).is_file(), f"{name} missing"
        assert (model_dir / name).stat().st_size > 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[arch]]
    assert config["model_type"] == arch
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config.get("chat_template")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_init_tiny_device_flag(device):
    args = build_parser().parse_args(["model", "init-tiny", "d", "--device", device])
    assert args.device == device
    assert build_parser().parse_args(["model", "init-tiny", "d"]).device == "cpu"


@pytest.mark.slow
def test_init_tiny_flags_reach_the_writer(tmp_path):
    from alignedserve.worker.tiny import init_tiny  # torch, for this test only

    flags = ("--arch", "opt", "--seed", "7", "--dtype", "bfloat16", "--device", "cpu")
    proc = cli("model", "init-tiny", str(tmp_path / "cli"), *flags)
    assert proc.returncode == 0, explain(proc)
    ref = init_tiny(tmp_path / "ref", arch="opt", seed=7, dtype="bfloat16", device="cpu")
    other = init_tiny(tmp_path / "other", arch="opt", seed=0, dtype="bfloat16", device="cpu")
    written = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert written == (ref / "model.safetensors").read_bytes()
    assert written != (other / "model.safetensors").read_bytes()  # the seed was passed


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_prints_one_output_per_prompt(runs, arch):
    assert runs[f"init-{arch}"].returncode == 0, explain(runs[f"init-{arch}"])
    proc = runs[f"generate-{arch}"]
    assert proc.returncode == 0, explain(proc)
    assert PROMPT_LINE.findall(proc.stdout) == ["'a'", "'bb'"]
    outputs = OUTPUT_LINE.findall(proc.stdout)
    assert [(n, reason) for n, reason, _ in outputs] == [("5", "length")] * 2, proc.stdout
    assert proc.stdout.count("(5 tokens") == 2
    assert re.search(r"^10 tokens in [\d.]+ s \([\d.]+ tok/s\) on cpu$", proc.stdout, re.M)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_generate_chat(runs):
    proc = runs["chat"]
    assert proc.returncode == 0, explain(proc)
    assert PROMPT_LINE.findall(proc.stdout) == ["'Hi there'"]
    ((n, reason, _),) = OUTPUT_LINE.findall(proc.stdout)
    assert 1 <= int(n) <= 5
    assert reason == ("length" if n == "5" else "stop")


@pytest.mark.slow
def test_invalid_sampling_value_is_a_clean_error(runs):
    proc = runs["bad-temperature"]
    assert proc.returncode != 0, explain(proc)
    assert "temperature" in proc.stderr and "error" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("generate", "--prompt", "a", "--temperature", "abc"), "--temperature"),
        (("generate", "--prompt", "a", "--max-tokens", "1.5"), "--max-tokens"),
        (("generate", "--max-tokens", "5"), "--prompt"),
        (("model", "init-tiny", "unused-dir", "--arch", "gpt2"), "--arch"),
        (("model", "init-tiny", "unused-dir", "--dtype", "int8"), "--dtype"),
        (("model", "init-tiny", "unused-dir", "--device", "gpu0"), "--device"),
    ],
    ids=[
        "temperature-not-a-number",
        "max-tokens-not-an-int",
        "no-prompt",
        "arch",
        "dtype",
        "device",
    ],
)
def test_argument_errors_exit_2_with_usage(args, flag, tmp_path):
    proc = cli(*args, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, explain(proc)
    assert "usage: alignedserve" in proc.stderr
    assert flag in proc.stderr and "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "unused-dir").exists()
