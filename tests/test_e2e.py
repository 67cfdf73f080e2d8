"""The whole stack as `alignedserve serve` runs it (the router in this process, the batcher and
the worker each in a supervised child process, loopback gRPC), driven by the official `openai`
client."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.serve import ServeConfig
from alignedserve.worker.generate import LocalRuntime

from factories import random_prompts
from serve_harness import Stack


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A model of its own name: the tests below tell the batcher child's series from this
    process's by it, and other modules run batchers in this process (whose series name
    their model)."""
    from alignedserve.worker.tiny import init_tiny

    return str(init_tiny(tmp_path_factory.mktemp("e2e-model"), arch="llama"))


@pytest.fixture(scope="module")
def stack(model_dir):
    s = Stack(ServeConfig(model=model_dir, port=0, pool_gib=0.1, drain_s=5))
    yield s
    s.close()


def client(stack, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, **kw)


def test_openai_client_completions_and_streamed_chat(stack):
    c = client(stack)
    model = c.models.list().data[0].id
    assert model == stack.model
    done = c.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == len(done.choices[0].text.encode()) or done.usage
    assert done.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi there"}],
        max_tokens=12,
        temperature=0,
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_greedy_through_the_stack_equals_the_runtime(stack, model_dir):
    prompts = random_prompts((4, 19, 33, 8), seed=9)
    runtime = LocalRuntime.from_dir(model_dir)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = runtime.generate(prompts, [params] * len(prompts))
    tokenizer = Tokenizer.from_dir(model_dir)
    c = client(stack)
    for prompt, ref in zip(prompts, expected, strict=True):
        got = c.completions.create(
            model=stack.model,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.choices[0].text == tokenizer.decode(ref.token_ids)
        assert got.usage.completion_tokens == 24


def test_n_seeded_samples_and_a_batch_of_prompts_through_the_stack(stack, model_dir):
    """Sample j of a seeded request is that request alone with seed + j, sampled by the
    worker; a batch of prompts gives each prompt's own greedy tokens, in order."""
    c = client(stack)
    args = dict(model=stack.model, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    many = c.completions.create(prompt="Once upon", n=3, seed=11, **args)
    alone = [
        c.completions.create(prompt="Once upon", seed=11 + j, **args).choices[0].text
        for j in range(3)
    ]
    assert [choice.text for choice in many.choices] == alone
    assert len(set(alone)) == 3  # three seeds, three samples
    prompts = random_prompts((5, 12, 30), seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LocalRuntime.from_dir(model_dir).generate(prompts, [params] * len(prompts))
    tokenizer = Tokenizer.from_dir(model_dir)
    got = c.completions.create(model=stack.model, prompt=prompts, max_tokens=10, temperature=0,
                               extra_body={"ignore_eos": True})  # fmt: skip
    assert [choice.text for choice in got.choices] == [
        tokenizer.decode(ref.token_ids) for ref in expected
    ]
    assert got.usage.prompt_tokens == sum(map(len, prompts))
    assert got.usage.completion_tokens == 30


def test_logit_bias_forces_a_token_and_bans_another_through_the_stack(stack, model_dir):
    c = client(stack)
    tokenizer = Tokenizer.from_dir(model_dir)
    args = dict(model=stack.model, prompt="Once upon", max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True}, logprobs=1)  # fmt: skip
    plain = c.completions.create(**args)
    first = tokenizer.encode(plain.choices[0].logprobs.tokens[0], add_special_tokens=False)[0]
    (x,) = tokenizer.encode("x", add_special_tokens=False)
    forced = c.completions.create(**args, logit_bias={str(x): 100})
    assert forced.choices[0].text == "x" * 6
    banned = c.completions.create(**args, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    # sampled rows keep the bias too; min_p = 1 keeps only the most likely token: greedy
    sampled = c.completions.create(
        **{**args, "temperature": 1.0, "extra_body": {"ignore_eos": True, "min_p": 1.0}}, seed=4
    )
    assert sampled.choices[0].text == plain.choices[0].text
    unfiltered = c.completions.create(**{**args, "temperature": 1.0}, seed=4)
    assert unfiltered.choices[0].text != plain.choices[0].text  # so min_p made the difference


def test_200_concurrent_streams_then_50_aborted_free_their_blocks(stack):
    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with openai.AsyncOpenAI(
            base_url=f"{stack.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(limits=limits, timeout=120),
        ) as c:

            async def one(i: int, abort: bool):
                stream = await c.completions.create(
                    model=stack.model,
                    prompt=f"request {i} " * (1 + i % 7),
                    max_tokens=64 if not abort else 1500,
                    temperature=0.8,
                    seed=i,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                n, usage = 0, None
                async for chunk in stream:
                    if chunk.choices:
                        n += 1
                    usage = chunk.usage or usage
                    if abort and n >= 3:
                        await stream.close()  # the client goes away mid-stream
                        return None
                return usage

            results = await asyncio.gather(*(one(i, i < 50) for i in range(250)))
            return results

    results = asyncio.run(main())
    completed = [u for u in results[50:]]
    assert len(completed) == 200
    assert all(u is not None and u.completion_tokens == 64 for u in completed)
    deadline = time.monotonic() + 20
    while stack.metric("alignedserve:cpu_pool_usage_perc") > 0 or stack.metric(
        "alignedserve:num_requests_running"
    ):
        assert time.monotonic() < deadline, "aborted requests kept their blocks"
        time.sleep(0.1)
    assert stack.metric("alignedserve:request_success_total") >= 200


def test_killing_the_worker_process_mid_run_loses_no_request(stack):
    """SIGKILL the worker while 6 streams are mid-generation: the supervisor restarts it, the
    batcher re-prefills from the pool, and every stream finishes with the text it would have
    had without the kill."""
    supervisor = stack.ports["worker"]
    restarts = supervisor.restarts
    c = client(stack, timeout=120)
    args = dict(model=stack.model, max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    unkilled = [c.completions.create(prompt=[5 + i, 6, 7, 8], **args) for i in range(2)]
    progress = [0] * 6

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as ac:

            async def one(i):
                stream = await ac.completions.create(prompt=[5 + i, 6, 7, 8], stream=True, **args)
                text = ""
                async for chunk in stream:
                    text += chunk.choices[0].text
                    progress[i] += 1
                return text

            tasks = [asyncio.create_task(one(i)) for i in range(6)]
            while min(progress) < 5:
                await asyncio.sleep(0.005)
            at_kill = list(progress)
            os.kill(supervisor.process.pid, signal.SIGKILL)
            return at_kill, await asyncio.gather(*tasks)

    at_kill, texts = asyncio.run(main())
    assert supervisor.restarts == restarts + 1
    assert max(at_kill) < 300  # every stream was mid-run at the kill
    assert texts[:2] == [u.choices[0].text for u in unkilled]
    assert all(len(t) > 0 for t in texts)


def test_the_batcher_runs_in_its_own_process_and_its_series_reach_the_routers_metrics(stack):
    batcher = stack.ports["batcher"].process
    assert batcher.returncode is None and batcher.pid not in (os.getpid(), None)
    assert batcher.pid != stack.ports["worker"].process.pid
    assert ("alignedserve:worker_ready", stack.model) not in stack.local_series()  # not ours
    assert stack.metric("alignedserve:worker_ready", stack.model) == 1  # the batcher child's
    before = stack.metric("alignedserve:request_queue_time_seconds_count")
    client(stack).completions.create(model=stack.model, prompt="x", max_tokens=2)
    assert stack.metric("alignedserve:request_queue_time_seconds_count") == before + 1


def test_the_workers_start_reaches_the_metrics_by_phase(stack):
    """The worker's ModelInfo gives its start by phase, and the batcher exports it on
    attaching: a CPU worker loads in seconds, warms nothing up and has no kernel cache."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.url}/metrics").text
    samples = {
        (sample.name, sample.labels.get("phase")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model_name") == stack.model
    }
    assert 0 < samples[("alignedserve:worker_start_seconds", "load")] < 60
    assert samples[("alignedserve:worker_start_seconds", "warm_up")] == 0
    assert samples[("alignedserve:worker_kernel_cache_entries", None)] == 0


def test_killing_the_batcher_process_restarts_it_and_the_stack_serves_again(stack):
    """SIGKILL the batcher: its supervisor restarts it on the same port, it attaches to the
    worker again, and the router's client reconnects; new requests are served."""
    supervisor = stack.ports["batcher"]
    restarts, killed = supervisor.restarts, supervisor.process.pid
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while supervisor.restarts == restarts or supervisor.process.pid == killed:
        assert time.monotonic() < deadline, "the batcher was not restarted"
        time.sleep(0.1)
    c = client(stack, timeout=30)
    while True:
        try:
            done = c.completions.create(
                model=stack.model, prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
            )
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            assert time.monotonic() < deadline, "the stack never served again"
            time.sleep(0.2)
    assert done.usage.completion_tokens == 3
    assert supervisor.restarts == restarts + 1 and supervisor.process.returncode is None
    while stack.metric("alignedserve:worker_ready", stack.model) != 1:  # the new batcher's
        assert time.monotonic() < deadline, "no worker_ready from the restarted batcher"
        time.sleep(0.1)


def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(stack):
    bad = [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b'{"model": "MODEL", "prompt": "x", "max_tokens": -1}'),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}'),
        ("/v1/chat/completions", b'{"model": "MODEL", "messages": []}'),
        ("/v1/completions", b'{"model": "MODEL", "prompt": "x", "temperature": "hot"}'),
        ("/v1/completions", b'{"model": "MODEL", "prompt": [1, 2], "max_tokens": 100000}'),
    ]
    for path, body in bad:
        body = body.replace(b"MODEL", stack.model.encode())
        r = httpx.post(stack.url + path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert r.json()["error"]["message"]
    # (EOS ignored: the random model samples it now and then, which would end it early)
    ok = client(stack).completions.create(
        model=stack.model, prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 2
