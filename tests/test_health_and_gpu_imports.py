"""Every server carries the standard gRPC health service (our own declaration of it, since
the GPU images have no grpcio-health-checking), and the worker's import path needs only what
those images have."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc

from alignedserve.common import rpc
from alignedserve.common.proto import health_pb2, health_pb2_grpc

# What the GPU machines' python3 has (../shared/notes/gpu-facts.md, checked there 2026-11-21),
# with torch's and transformers' own dependencies.
GPU_IMAGE = {
    "torch", "triton", "grpcio", "protobuf", "prometheus_client", "prometheus-client", "numpy",
    "safetensors", "tokenizers", "transformers", "jinja2", "Jinja2", "MarkupSafe", "markupsafe",
    "filelock", "typing_extensions", "typing-extensions", "sympy", "mpmath", "networkx",
    "fsspec", "setuptools",
}  # fmt: skip


def test_official_health_client_sees_our_service():
    async def main():
        server, health = rpc.aio_server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await rpc.set_serving(health, ["alignedserve.v1.Worker"], True)
        client = textwrap.dedent(
            f"""
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:{port}"))
            for name in ("", "alignedserve.v1.Worker"):
                print(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", client, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            await rpc.set_serving(health, [], False)
            second = await watch.read()
            watch.cancel()
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                missing = None
            except grpc.aio.AioRpcError as e:
                missing = e.code()
        await server.stop(0)
        return proc.returncode, out.decode().split(), err.decode(), first, second, missing

    rc, statuses, err, first, second, missing = asyncio.run(main())
    assert rc == 0, err
    assert statuses == ["1", "1"]  # SERVING, as the official client decodes it
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert missing == grpc.StatusCode.NOT_FOUND


def test_worker_and_batcher_import_with_only_what_the_gpu_image_has():
    """Import the worker's and batcher's service paths with every other distribution made
    unimportable (a meta-path finder stands in for a machine that lacks them): optional
    imports that fail quietly are fine, a hard dependency fails the import."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, importlib.metadata as md, sys
        allowed = {sorted(GPU_IMAGE)!r}
        owners = md.packages_distributions()

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                dists = owners.get(top)
                if top != "alignedserve" and dists and not set(dists) & set(allowed):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not on GPU images)")
                return None

        sys.meta_path.insert(0, Missing())
        import alignedserve.worker.service, alignedserve.batcher.service
        import alignedserve.worker.runner, alignedserve.worker.prefetch
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
