"""benchmarks/e2e_servers.py's vllm variants, on a stand-in for vLLM's OpenAI server: a
package named vllm under --vllm-site whose api_server module records how it was started and
answers /v1/models. What this checks is the harness: the site first on the child's path, the
device, the KV size each variant asks for, readiness, and the stop."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignedserve.serve import free_port

from factories import benchmark_module

STAND_IN = """
import http.server, json, os, sys
json.dump({"argv": sys.argv[1:], "pythonpath": os.environ["PYTHONPATH"],
           "devices": os.environ["CUDA_VISIBLE_DEVICES"],
           "flashinfer_sampler": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER")},
          open(os.environ["STARTED_AS"], "w"))

class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/v1/models"
        body = json.dumps({"data": [{"id": "m"}]}).encode() if ok else b""
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(body)

port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
"""


@pytest.fixture(scope="module")
def e2e_servers():
    return benchmark_module("e2e_servers")


@pytest.mark.parametrize(
    ("variant", "kv_flag", "devices"),
    [
        ("vllm", ["--gpu-memory-utilization", "0.9"], "1"),
        ("vllm-samekv", ["--kv-cache-memory-bytes", str(88 * 2**30)], "1"),  # our device KV
        ("vllm-dp2", ["--kv-cache-memory-bytes", str(88 * 2**30)], "1,0"),  # both GPUs
    ],
)
def test_a_vllm_variant_starts_from_its_site_with_the_kv_it_is_given(
    e2e_servers, tmp_path, variant, kv_flag, devices
):
    site = tmp_path / "site"
    api = site / "vllm" / "entrypoints" / "openai"
    api.mkdir(parents=True)
    for folder in (site / "vllm", site / "vllm" / "entrypoints", api):
        (folder / "__init__.py").write_text("")
    (api / "api_server.py").write_text(textwrap.dedent(STAND_IN))
    started_as = tmp_path / "started.json"
    args = SimpleNamespace(
        vllm_site=str(site), device="cuda:1", prefetch_device="cuda:0", port=free_port(),
        pool_gib=48, device_kv_gib=88,
    )  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/ours", "STARTED_AS": str(started_as)}
    model = Path("/models/opt-13b-random")
    with e2e_servers.serving(variant, args, model, env, 0, tmp_path / "logs"):
        started = json.loads(started_as.read_text())
        assert e2e_servers.http_get(f"http://127.0.0.1:{args.port}/v1/models") is not None
    assert started["pythonpath"] == f"{site}:/ours"  # vLLM's own FastAPI first
    assert started["devices"] == devices
    assert started["flashinfer_sampler"] == "0"  # no JIT compile at start (greedy bench)
    argv = started["argv"]
    assert argv[argv.index("--model") + 1] == str(model)
    assert argv[-2:] == kv_flag
    assert ("--data-parallel-size" in argv) == (variant == "vllm-dp2")
    if variant == "vllm-dp2":
        assert argv[argv.index("--data-parallel-size") + 1] == "2"
    assert e2e_servers.http_get(f"http://127.0.0.1:{args.port}/v1/models") is None  # stopped


def test_a_vllm_variant_without_a_site_fails_at_once(e2e_servers, tmp_path):
    args = SimpleNamespace(vllm_site="", device="cuda:0", port=free_port())
    with (
        pytest.raises(RuntimeError, match="needs --vllm-site"),
        e2e_servers.serving("vllm", args, Path("/m"), {}, 0, tmp_path),
    ):
        pass
