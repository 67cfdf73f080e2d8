"""The router end to end: uvicorn on a loopback port, the official OpenAI client, and a real
gRPC fake batcher (tests/fake_batcher.py) behind it."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from alignedserve.common.errors import ConfigError
from alignedserve.common.proto import batcher_pb2
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.router import wire
from alignedserve.router.app import create_app
from alignedserve.router.batcher_stream import BatcherError
from alignedserve.router.client import BatcherClient
from alignedserve.router.config import RouterConfig, add_router_arguments, config_from_args
from alignedserve.router.generation import generate_text
from alignedserve.router.preprocess import GenerationInput
from alignedserve.router.request_stats import RequestStats
from alignedserve.router.server import RouterServer
from alignedserve.router.stop import StopMatcher
from alignedserve.router.wire import GenerateChunk
from alignedserve.serve import free_port

from factories import metric_samples
from fake_batcher import NUM_BYTE_TOKENS, FakeBatcher, FakeBatcherFactory, eventually, logprob_of

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
CONTEXT = 2048  # the tiny llama's max_position_embeddings


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from alignedserve.worker.tiny import init_tiny  # torch, in the test process only

    return init_tiny(tmp_path_factory.mktemp("model") / MODEL, arch="llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeBatcherFactory]:
    factory = FakeBatcherFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def fake(fakes) -> FakeBatcher:
    return fakes()


@contextmanager
def running_router(config: RouterConfig) -> Iterator[RouterServer]:
    client = BatcherClient.from_config(config)
    ready = threading.Event()
    server = RouterServer(config, create_app(config, client), ready_event=ready)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert ready.wait(10), "router did not start"
    try:
        yield server
    finally:
        server.begin_drain()
        thread.join(10)
        assert not thread.is_alive(), "router did not stop"


def loopback_config(model_dir, fake, **options) -> RouterConfig:
    """A router on a free loopback port before one fake batcher, polling its load often."""
    return RouterConfig(
        model_dir=str(model_dir),
        batcher_addresses=(fake.address,),
        host="127.0.0.1",
        port=free_port(),
        **({"load_poll_interval_s": 0.05, "ready_window_s": 0.5} | options),
    )


@pytest.fixture(scope="module")
def router(model_dir, fake) -> Iterator[str]:
    config = loopback_config(model_dir, fake, hold_timeout_s=1.0)
    with running_router(config):
        yield f"http://127.0.0.1:{config.port}"


@pytest.fixture(autouse=True)
def healthy_fake(fake) -> Iterator[None]:
    yield
    fake.reject_with = None
    fake.fail_after = None
    fake.worker_ready = True


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be retried away by the client.
    return openai.OpenAI(base_url=f"{router}/v1", api_key="x", max_retries=0, timeout=10)


def expected_text(tokenizer: Tokenizer, prompt_ids: list[int], num_tokens: int) -> str:
    """What the fake generates: the prompt's byte tokens, cycled."""
    script = [t for t in prompt_ids if t < NUM_BYTE_TOKENS]
    return tokenizer.decode(list(itertools.islice(itertools.cycle(script), num_tokens)))


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def router_samples(router: str) -> dict[tuple[str, tuple], float]:
    return metric_samples(httpx.get(f"{router}/metrics").text)


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"model_name": MODEL, **labels}.items()))), 0.0)


# ---- the API, through the official client ------------------------------------------------------


def test_completion(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8)
    prompt_ids = tokenizer.encode("Hello world")
    assert out.choices[0].text == expected_text(tokenizer, prompt_ids, 8) == "Hello wo"
    assert out.choices[0].finish_reason == "length"
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == len(prompt_ids) + 8


def test_completion_from_token_ids(client, tokenizer):
    ids = tokenizer.encode("abc", add_special_tokens=False)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert out.choices[0].text == "abcab"
    assert out.usage.prompt_tokens == 3


def test_chat_completion(client, tokenizer, fake):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, seed=7, top_p=0.9
    )
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    assert out.choices[0].message.content == expected_text(tokenizer, prompt_ids, 12)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 12
    request_id, sent_ids, params = fake.requests[-1]
    assert request_id == out.id and sent_ids == prompt_ids
    assert params == SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)


def test_n_choices_of_one_prompt_each_a_request_with_its_own_seed(client, fake):
    one = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, seed=7)
    num_requests = len(fake.requests)
    many = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    # the fake ignores seeds: every choice is the one-choice text
    assert [c.text for c in many.choices] == [one.choices[0].text] * 3
    assert [c.finish_reason for c in many.choices] == ["length"] * 3
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert many.usage.completion_tokens == 3 * 5
    sent = sorted(fake.requests[num_requests:])
    assert [r[0] for r in sent] == [f"{many.id}-{k}" for k in range(3)]
    assert [r[2].seed for r in sent] == [7, 8, 9]  # sample j: the seed + j
    unseeded = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, n=2)
    assert len(unseeded.choices) == 2 and all(r[2].seed is None for r in fake.requests[-2:])


def test_a_batch_of_prompts_numbers_choices_prompt_first(client, tokenizer):
    prompts = ["abc", "hello there"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4) for p in prompts]
    texts = [a.choices[0].text for a in alone]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert out.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert out.usage.completion_tokens == 4 * 4
    ids = [tokenizer.encode(p) for p in prompts]  # a batch of token id lists
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
    assert [c.text for c in out.choices] == texts


def test_streamed_choices_equal_whole_ones_and_usage_counts_them_all(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Stream us"}], max_tokens=9)
    whole = client.chat.completions.create(**kwargs, n=3)
    stream = client.chat.completions.create(
        **kwargs, n=3, stream=True, stream_options={"include_usage": True}
    )
    texts, roles, finished, usage = {}, [], {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles += [c.index] if c.delta.role else []
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert sorted(roles) == [0, 1, 2]  # one role chunk a choice
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 3 * 9


def test_each_choice_has_its_own_logprobs_and_text_offsets(client):
    single = client.completions.create(model=MODEL, prompt="abcd", max_tokens=4, logprobs=1)
    out = client.completions.create(model=MODEL, prompt="abcd", max_tokens=4, logprobs=1, n=2)
    for c in out.choices:
        assert c.logprobs.text_offset == single.choices[0].logprobs.text_offset
        assert c.logprobs.token_logprobs == single.choices[0].logprobs.token_logprobs
    streamed = client.completions.create(
        model=MODEL, prompt="abcd", max_tokens=4, logprobs=1, n=2, stream=True
    )
    offsets: dict[int, list[int]] = {}
    for chunk in streamed:
        for c in chunk.choices:
            offsets.setdefault(c.index, []).extend(c.logprobs.text_offset if c.logprobs else [])
    assert offsets == {i: single.choices[0].logprobs.text_offset for i in (0, 1)}


def test_closing_a_stream_of_choices_cancels_every_one(client, fake):
    num_requests = len(fake.requests)
    stream = client.completions.create(
        model=MODEL, prompt=["long", "longer"], max_tokens=1000, n=2, stream=True
    )
    next(iter(stream))
    stream.close()
    assert fake.wait_for(lambda: len(fake.requests) == num_requests + 4)
    ids = [r[0] for r in fake.requests[num_requests:]]
    assert fake.wait_for(lambda: set(ids) <= set(fake.cancelled), timeout_s=2.0)


def test_a_refused_choice_refuses_the_request_and_cancels_the_others(client, fake):
    fake.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=3, n=3, stream=stream)
    fake.reject_with = None
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, n=3)
    assert len(out.choices) == 3  # and serving goes on


def test_a_choice_failing_mid_stream_ends_the_stream_with_an_error_event(client, fake):
    fake.fail_after = 3
    stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=20, n=2,
                                       stream=True)  # fmt: skip
    with pytest.raises(openai.APIError, match="worker lost"):
        list(stream)


def test_min_p_and_logit_bias_reach_the_batcher(client, fake):
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        logit_bias={"97": 100, "5": -100, "12": 2.5}, extra_body={"min_p": 0.1},
    )  # fmt: skip
    params = fake.requests[-1][2]
    assert params.min_p == 0.1
    assert params.logit_bias == ((5, -100.0), (12, 2.5), (97, 100.0))


def test_a_max_tokens_the_router_fills_in_is_marked_so(client, fake):
    """Without max_tokens the router sends the context's room (at most default_max_tokens),
    marked as filled in: the batcher's load order ranks only the max_tokens clients set."""
    prompt = [5] * 2040  # the tiny model's context: 2,048 tokens
    out = client.completions.create(model=MODEL, prompt=prompt)
    assert out.usage.completion_tokens == 8
    assert fake.requests[-1][2] == SamplingParams(max_tokens=8, is_default_max_tokens=True)
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert fake.requests[-1][2] == SamplingParams(max_tokens=8)
    messages = [{"role": "user", "content": "Hi"}]  # chat, by the newer name of the field
    client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    assert fake.requests[-1][2] == SamplingParams(max_tokens=3)


def test_streamed_chat_equals_whole_and_ends_with_usage(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Stream me"}], max_tokens=20)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # without include_usage, no usage chunk
    plain = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def test_streaming_never_splits_a_character(client):
    prompt = "héllo wörld ✓ 🙂"  # 2-, 3- and 4-byte characters, one byte per token
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == whole.choices[0].text
    assert "\ufffd" not in whole.choices[0].text and "🙂" in whole.choices[0].text


def test_continuous_usage_counts_every_token_once_held_back_ones_included(client):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage so far, so a
    benchmark counts the tokens of a chunk that releases held-back bytes exactly."""
    prompt = "héllo wörld ✓ 🙂"  # one byte per token: multi-byte characters are held back
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=40, stream=True)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(**kwargs, stream_options=options))
    *with_text, last = chunks
    counts = [c.usage.completion_tokens for c in with_text]
    steps = [b - a for a, b in zip([0, *counts[:-1]], counts, strict=True)]
    assert all(step >= 1 for step in steps) and max(steps) > 1  # some chunk carried several
    assert counts[-1] == 40 and last.choices == [] and last.usage.completion_tokens == 40
    assert {c.usage.prompt_tokens for c in chunks} == {last.usage.prompt_tokens}
    # the extension only adds to include_usage, as in vLLM
    alone = list(
        client.completions.create(**kwargs, stream_options={"continuous_usage_stats": True})
    )
    assert all(c.usage is None for c in alone)


def test_completion_logprobs(client, tokenizer):
    for logprobs in (0, 1):
        out = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=6, logprobs=logprobs
        )
        lp = out.choices[0].logprobs
        assert lp.token_logprobs == [logprob_of(i) for i in range(6)]
        assert "".join(lp.tokens) == out.choices[0].text == "HelloH"
        assert lp.text_offset == [0, 1, 2, 3, 4, 5]
    stream = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, logprobs=1, stream=True
    )
    streamed = [x for c in stream for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == [logprob_of(i) for i in range(6)]


def test_chat_logprobs(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    out = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=0)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == [logprob_of(i) for i in range(5)]
    assert "".join(c.token for c in content) == out.choices[0].message.content
    assert all(c.bytes == list(c.token.encode()) and c.top_logprobs == [] for c in content)
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "alignedserve"
    # the client's retrieve, as tools that check a model before using it call it
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no/such-model")
    assert err.value.status_code == 404
    assert "no/such-model" in err.value.body["message"]


def test_stop_strings_truncate_and_abort_downstream(client, fake):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=50, stop=["brown"])
    assert out.choices[0].text == "The quick "
    assert out.choices[0].finish_reason == "stop"
    assert out.id in fake.aborted  # the batcher stopped generating for it
    # streamed: the stop string spans five one-token chunks; none of it is ever sent
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=50, stop=["xyz", "ck b"], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "The qui"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a possible stop string held back, then released at the end
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stop="quid")
    assert out.choices[0].text == "The quick "
    assert out.choices[0].finish_reason == "length"
    # chat, with a single stop string
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=30, stop="\n"
    )
    assert chat.choices[0].message.content == "user"  # the template's "user\n\n" comes first
    assert chat.choices[0].finish_reason == "stop"


def test_a_stop_string_aborts_once_before_the_last_chunk(client, fake):
    stream = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=50, stop="brown", stream=True
    )
    # the chunk with a finish_reason (the last), with the aborts the fake had when it came
    ends = [
        (c.id, c.choices[0].finish_reason, list(fake.aborts_received))
        for c in stream
        if c.choices and c.choices[0].finish_reason is not None
    ]
    ((request_id, finish_reason, aborts_then),) = ends
    assert finish_reason == "stop"
    assert request_id in aborts_then  # freed at the batcher before the client hears the end
    # The next request goes on the same Stream call, behind any abort of the first one sent
    # as its stream closed: once the fake has it, it has read all the aborts there were.
    after = client.completions.create(model=MODEL, prompt="next", max_tokens=1)
    assert fake.requests[-1][0] == after.id
    assert fake.aborts_received.count(request_id) == 1


def test_stop_token_ids(client, tokenizer):
    (q,) = tokenizer.encode("q", add_special_tokens=False)
    out = client.completions.create(
        model=MODEL,
        prompt="The quick brown fox",
        max_tokens=50,
        extra_body={"stop_token_ids": [q], "top_k": 5, "ignore_eos": True},
    )
    assert out.choices[0].text == "The "  # the stop token's text is left out
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 5


def test_client_disconnect_cancels_the_batcher_call(client, router, fake):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=1000, stream=True
    )
    request_id = next(iter(stream)).id
    stream.close()
    assert fake.wait_for(lambda: request_id in fake.cancelled, timeout_s=2.0)
    # non-streamed: the client hangs up once the batcher has the request
    num_requests = len(fake.requests)
    body = json.dumps({"model": MODEL, "prompt": "long", "max_tokens": 1000}).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    host, port = router.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert fake.wait_for(lambda: len(fake.requests) > num_requests)
    request_id = fake.requests[-1][0]
    assert fake.wait_for(lambda: request_id in fake.cancelled, timeout_s=2.0)


def test_queue_full_is_429_with_retry_after(client, fake):
    fake.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=stream)
        assert e.value.status_code == 429
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["type"] == "rate_limit_error"
        assert "queue full" in e.value.body["message"]
    # refused as unavailable (draining, or gone): held for another batcher until the hold
    # timeout, then 503
    fake.reject_with = grpc.StatusCode.UNAVAILABLE
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert e.value.status_code == 503
    assert time.monotonic() - start >= 0.9


def test_error_mid_stream_is_an_error_event(client, fake):
    fake.fail_after = 3
    stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=20, stream=True)
    with pytest.raises(openai.APIError, match="worker lost"):
        list(stream)


def test_unexpected_exception_is_500_then_serving_goes_on(client, monkeypatch):
    def broken(self, skip_special_tokens=True):
        raise RuntimeError("boom")

    monkeypatch.setattr(Tokenizer, "detokenizer", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert e.value.status_code == 500
    assert e.value.body == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text


# ---- probes and metrics ----------------------------------------------------------------------


def test_health_and_ready(router, fake):
    assert httpx.get(f"{router}/health").status_code == 200
    assert httpx.get(f"{router}/ready").status_code == 200
    fake.worker_ready = False  # the batcher answers, but has no worker: not ready
    deadline = time.monotonic() + 3
    while httpx.get(f"{router}/ready").status_code == 200:
        assert time.monotonic() < deadline, "/ready stayed 200 without a ready worker"
        time.sleep(0.05)
    reply = httpx.get(f"{router}/ready")
    assert reply.status_code == 503 and "ready worker" in reply.json()["error"]["message"]
    assert httpx.get(f"{router}/health").status_code == 200  # alive all the same
    fake.worker_ready = True
    deadline = time.monotonic() + 3
    while httpx.get(f"{router}/ready").status_code != 200:
        assert time.monotonic() < deadline, "/ready did not come back"
        time.sleep(0.05)


ROUTER_METRICS = (
    "num_requests_waiting",
    "num_requests_running",
    "num_requests_pooled",
    "kv_cache_usage_perc",
    "cpu_pool_usage_perc",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "batch_length_spread",
    "prefetch_seconds",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
    "batch_switches_total",
    "prefetch_bytes_total",
    "requests_rejected_total",
)


def test_metrics_move(client, router, tokenizer):
    text = httpx.get(f"{router}/metrics").text
    for name in ROUTER_METRICS:
        assert f"# TYPE alignedserve:{name} " in text, name
    before = router_samples(router)
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=7)
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=20, stop="cs")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="metrics", max_tokens=7, n=0)
    after = router_samples(router)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    prompt_tokens = len(tokenizer.encode("metrics"))
    assert moved("alignedserve:prompt_tokens_total") == 2 * prompt_tokens
    assert moved("alignedserve:generation_tokens_total") == 7 + 7  # "metrics" then "cs" stops
    assert moved("alignedserve:request_success_total", finished_reason="length") == 1
    assert moved("alignedserve:request_success_total", finished_reason="stop") == 1
    assert moved("alignedserve:requests_rejected_total", reason="invalid_request") == 1
    assert moved("alignedserve:time_to_first_token_seconds_count") == 2
    assert moved("alignedserve:e2e_request_latency_seconds_count") == 2
    assert moved("alignedserve:inter_token_latency_seconds_count") == 6 + 6
    assert moved("alignedserve:inter_token_latency_seconds_sum") > 0


# ---- bad requests ----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = list(range(100)) * 21  # 2100 token ids: over the 2048-token context

# (path, body: dict, or str sent as is), status, param, words in the message
BAD_INPUTS = {
    "malformed JSON": (COMPLETIONS, '{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    "body not an object": (COMPLETIONS, "[1, 2, 3]", 400, None, "JSON object"),
    "empty body": (CHAT, "", 400, None, "JSON object"),
    "missing model": (COMPLETIONS, {"prompt": "hi"}, 400, "model", "required"),
    "unknown model": (COMPLETIONS, {"model": "gpt-9", "prompt": "hi"}, 404, "model", "gpt-9"),
    "max_tokens wrong type": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "max_tokens": "5"},
        400,
        "max_tokens",
        "valid integer",
    ),
    "negative max_tokens": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "max_tokens": -1},
        400,
        "max_tokens",
        ">= 1",
    ),
    "temperature out of range": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "temperature": -0.5},
        400,
        "temperature",
        "temperature",
    ),
    "top_p 0": (CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p", "(0, 1]"),
    "n=0": (CHAT, {"model": MODEL, "messages": USER, "n": 0}, 400, "n", "n=0 must be >= 1"),
    "more choices than one request may ask for": (
        COMPLETIONS,
        {"model": MODEL, "prompt": ["a", "b", "c"], "n": 100},
        400,
        "n",
        "300 choices: at most 256",
    ),
    "empty messages": (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "non-empty"),
    "missing messages": (CHAT, {"model": MODEL}, 400, "messages", "required"),
    "bad role": (
        CHAT,
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
        "wizard",
    ),
    "image content": (
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content",
        "text",
    ),
    "prompt over the context": (
        COMPLETIONS,
        {"model": MODEL, "prompt": LONG_PROMPT},
        400,
        "prompt",
        "context length is 2048",
    ),
    "max_tokens + prompt over the context": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "max_tokens": 2047},
        400,
        "max_tokens",
        "context length is 2048",
    ),
    "max_completion_tokens + messages over the context": (
        CHAT,
        {"model": MODEL, "messages": USER, "max_completion_tokens": 2040},
        400,
        "max_completion_tokens",
        "context length",
    ),
    "empty prompt": (COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    "a batch of strings and token ids mixed": (
        COMPLETIONS,
        {"model": MODEL, "prompt": ["a", [98]]},
        400,
        "prompt",
        "a list of strings or of token id lists",
    ),
    "an empty prompt in a batch": (
        COMPLETIONS,
        {"model": MODEL, "prompt": ["a", ""]},
        400,
        "prompt[1]",
        "prompt[1] is empty",
    ),
    "a token id outside the vocabulary in a batch": (
        COMPLETIONS,
        {"model": MODEL, "prompt": [[97], [1, 99999]]},
        400,
        "prompt[1]",
        "99999",
    ),
    "token id outside the vocabulary": (
        COMPLETIONS,
        {"model": MODEL, "prompt": [1, 99999]},
        400,
        "prompt",
        "99999",
    ),
    "logprobs too high": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "logprobs": 5},
        400,
        "logprobs",
        "not supported",
    ),
    "top_logprobs > 0": (
        CHAT,
        {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 2},
        400,
        "top_logprobs",
        "not supported",
    ),
    "stop of a wrong type": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "stop": 42},
        400,
        "stop",
        "string",
    ),
    "empty stop string": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "stop": ["ok", ""]},
        400,
        "stop",
        "empty",
    ),
    "echo": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "echo": True},
        400,
        "echo",
        "not supported",
    ),
    "stream_options of a wrong type": (
        CHAT,
        {"model": MODEL, "messages": USER, "stream": True, "stream_options": "usage"},
        400,
        "stream_options",
        "dictionary",
    ),
    "stream_options without stream": (
        CHAT,
        {"model": MODEL, "messages": USER, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream is true",
    ),
    "penalty": (
        CHAT,
        {"model": MODEL, "messages": USER, "presence_penalty": 0.5},
        400,
        "presence_penalty",
        "not supported",
    ),
    "logit_bias key not a token id": (
        CHAT,
        {"model": MODEL, "messages": USER, "logit_bias": {"hello": 5}},
        400,
        "logit_bias",
        "not a token id",
    ),
    "logit_bias key outside the vocabulary": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "logit_bias": {"99999": -100}},
        400,
        "logit_bias",
        "99999",
    ),
    "logit_bias value out of range": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 150}},
        400,
        "logit_bias",
        "[-100, 100]",
    ),
    "min_p out of range": (
        CHAT,
        {"model": MODEL, "messages": USER, "min_p": 2},
        400,
        "min_p",
        "[0, 1]",
    ),
    "seed out of range": (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "seed": -3},
        400,
        "seed",
        "seed",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_an_openai_error(router, fake, case):
    path, body, status, param, words = BAD_INPUTS[case]
    num_requests = len(fake.requests)
    if isinstance(body, str):
        reply = httpx.post(
            f"{router}{path}", content=body, headers={"content-type": "application/json"}
        )
    else:
        reply = httpx.post(f"{router}{path}", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"], error["message"]
    assert len(fake.requests) == num_requests  # refused before reaching the batcher


def test_bad_inputs_through_the_official_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_still_serving_after_bad_inputs(client):
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=4)
    assert out.choices[0].text == "stil"


@pytest.mark.parametrize(
    ("http_parser", "event_loop", "protocol", "loop_module"),
    [
        ("httptools", "uvloop", "HttpToolsProtocol", "uvloop"),
        ("h11", "asyncio", "H11Protocol", "asyncio"),
    ],
)
def test_both_http_stacks_serve_the_api(
    model_dir, fake, tokenizer, http_parser, event_loop, protocol, loop_module
):
    """The default stack (httptools on uvloop, where installed) and the pure-Python one
    (h11 on asyncio's loop) answer the same: a stream, a whole answer, a 400."""
    config = loopback_config(model_dir, fake, http_parser=http_parser, event_loop=event_loop)
    with running_router(config) as server:
        assert server.config.http_protocol_class.__name__ == protocol
        assert type(server.servers[0]).__module__.split(".")[0] == loop_module
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{config.port}/v1", api_key="x", max_retries=0
        )
        messages = [{"role": "user", "content": "stack"}]
        whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
        chunks = api.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        want = expected_text(tokenizer, chat_prompt_ids(tokenizer, messages), 12)
        assert whole.choices[0].message.content == streamed == want
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(model=MODEL, messages=messages, max_tokens=-1)
        assert bad.value.body["type"] == "invalid_request_error"


def test_unknown_route_is_an_openai_404(router):
    reply = httpx.get(f"{router}/v1/nothing")
    assert reply.status_code == 404 and "message" in reply.json()["error"]


# ---- drain on SIGTERM, in a real process ---------------------------------------------------------


@contextmanager
def router_process(model_dir, fake, tmp_path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m alignedserve.router` on a free port, its output piped; yields it and its
    URL once /ready answers 200, and kills it at the end if it still runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "alignedserve.router", "--model-dir", str(model_dir)]
    argv += ["--batcher-addresses", fake.address, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--load-poll-interval-s", "0.05", "--drain-timeout-s", "10"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "router process did not become ready"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_in_flight_streams(model_dir, fake, tmp_path):
    with router_process(model_dir, fake, tmp_path) as (proc, url):
        body = {"model": MODEL, "prompt": "drain", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 3
            while httpx.get(f"{url}/ready").status_code != 503:  # noticed within a tick
                assert time.monotonic() < deadline, "/ready stayed 200 after SIGTERM"
                time.sleep(0.02)
            refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=10) == 0


def test_a_second_sigterm_during_the_drain_stops_at_once_and_cleanly(
    model_dir, fake, tmp_path, monkeypatch
):
    """The first SIGTERM drains; a second one stops the process within about a second, with
    its stream still going, and logs no error on the way (the app's shutdown still runs)."""
    monkeypatch.setattr(fake, "token_delay_s", 0.05)  # 300 tokens: 15 s, past the drain's 10
    with router_process(model_dir, fake, tmp_path) as (proc, url):
        body = {"model": MODEL, "prompt": "drain", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 3
            while httpx.get(f"{url}/ready").status_code != 503:
                assert time.monotonic() < deadline, "/ready stayed 200 after SIGTERM"
                time.sleep(0.02)
            stopped_from = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
            assert time.monotonic() - stopped_from < 3.0
            rest = [line for line in lines if line]
        # the stream was ended, not cut: its client is told, and the batcher freed it
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
        assert len(rest) < 300  # cut short: it had ~15 s of tokens to go
        assert fake.requests[-1][0] in fake.aborted  # by an Abort the batcher answered
        log = proc.stdout.read().decode()
        assert "stopping now" in log and "1 requests in flight aborted" in log
        assert "Traceback" not in log and " ERROR " not in log, log


# ---- parts -----------------------------------------------------------------------------------


def test_router_imports_no_torch(tmp_path):
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import alignedserve.router as router
        for m in pkgutil.iter_modules(router.__path__):
            if m.name != "__main__":
                importlib.import_module(f"alignedserve.router.{m.name}")
        importlib.import_module("alignedserve.router.__main__")
        heavy = [name for name in ("torch", "triton") if name in sys.modules]
        print(len(list(pkgutil.iter_modules(router.__path__))), heavy)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    num_modules, heavy = proc.stdout.split(maxsplit=1)
    assert int(num_modules) >= 10 and heavy.strip() == "[]", proc.stdout


def test_config_flags_are_generated_from_the_fields(model_dir):
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(
        ["--model-dir", str(model_dir), "--batcher-addresses", "a:1", "b:2", "--port", "9000"]
    )
    config = config_from_args(args)
    assert config.batcher_addresses == ("a:1", "b:2") and config.port == 9000
    assert config.served_model_name == MODEL  # the directory's name
    assert config.drain_timeout_s == RouterConfig.__dataclass_fields__["drain_timeout_s"].default
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-dir", "x"])  # --batcher-addresses is required
    with pytest.raises(ConfigError, match="port"):
        RouterConfig(model_dir="x", batcher_addresses=("a:1",), port=70000)
    with pytest.raises(ConfigError, match="batcher_addresses"):
        RouterConfig(model_dir="x", batcher_addresses=())


def test_wire_conversions():
    params = SamplingParams(max_tokens=5, temperature=0.5, seed=3, logprobs=True)
    msg = wire.generate_request_to_proto("r1", [1, 2, 3], params)
    assert (msg.request_id, list(msg.prompt_token_ids)) == ("r1", [1, 2, 3])
    assert msg.params.max_tokens == 5 and msg.params.seed == 3 and msg.params.logprobs
    running = wire.chunk_from_proto(
        batcher_pb2.GenerateResponse(token_ids=[7, 8], logprobs=[-0.5, -1.0])
    )
    assert running == wire.GenerateChunk((7, 8), (-0.5, -1.0), None, None)
    last = batcher_pb2.GenerateResponse(finish_reason="length")
    last.usage.prompt_tokens, last.usage.completion_tokens = 3, 9
    assert wire.chunk_from_proto(last) == wire.GenerateChunk((), (), "length", wire.Usage(3, 9))
    load = wire.load_from_proto(
        batcher_pb2.LoadReport(num_waiting=1, num_running=2, worker_ready=True, max_waiting=8)
    )
    assert load == wire.LoadReport(1, 2, 0, 0.0, True, 0, "", 8)
    assert load.num_context_tokens is None  # a batcher older than the field sent none
    idle = wire.load_from_proto(batcher_pb2.LoadReport(num_context_tokens=0))
    assert idle.num_context_tokens == 0  # sent, and zero


def test_stop_matcher():
    m = StopMatcher(["abc", "x"])
    assert m.feed("12a") == ("1", False)  # "2a" is held: more text may make it "..abc"
    assert m.feed("b") == ("2", False)
    assert m.feed("d") == ("a", False)  # "abd": no stop string after all
    assert m.feed("yabx") == ("bdyab", True)  # nothing from the stop string on
    assert StopMatcher(["cd", "b"]).feed("abcd") == ("a", True)  # the earliest hit wins
    plain = StopMatcher([])
    assert plain.feed("anything") == ("anything", False) and plain.flush() == ""
    held = StopMatcher(["end"])
    assert held.feed("the en") == ("the ", False) and held.flush() == "en"


def test_client_routes_to_the_least_loaded_batcher_and_around_a_full_one(fakes):
    busy, idle = fakes(token_delay_s=0.02), fakes(token_delay_s=0.001)
    params = SamplingParams(max_tokens=3)

    async def scenario() -> None:
        client = BatcherClient([busy.address, idle.address], poll_interval_s=0.02)
        only_busy = BatcherClient([busy.address])
        await client.start()
        await only_busy.start()
        try:
            assert client.is_ready() and all(b.last_ready_s > 0 for b in client.batchers)
            long = SamplingParams(max_tokens=500)
            held = [only_busy.generate(f"long{i}", [1, 2], long) for i in range(2)]
            assert all([(await anext(h)).token_ids for h in held])
            await asyncio.sleep(0.1)  # a load poll sees them
            assert [b.score("requests") for b in client.batchers] == [2, 0]
            busy_tokens, idle_tokens = (b.score("tokens") for b in client.batchers)
            assert busy_tokens >= 2 * 3 and idle_tokens == 0  # two prompts of 2, >= 1 token each
            chunks = [c async for c in client.generate("short", [5], params)]
            assert chunks[-1].finish_reason == "length"
            assert idle.requests[-1][0] == "short"
            for h in held:
                await h.aclose()
            # a full batcher is skipped, even the least loaded
            idle.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED
            chunks = [c async for c in client.generate("around", [5], params)]
            assert chunks[-1].usage == wire.Usage(1, 3) and busy.requests[-1][0] == "around"
            # all full: the refusal goes to the caller
            busy.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(BatcherError) as e:
                await anext(client.generate("nowhere", [5], params))
            assert e.value.http_status == 429
            assert not await client.abort("never-sent")
        finally:
            await client.close()
            await only_busy.close()

    asyncio.run(scenario())


_BURST_IDS = itertools.count()


def _burst(client: BatcherClient, prompt_lengths: list[int]) -> list[asyncio.Task]:
    """Requests sent at once, before any load poll can count them; each task waits for its
    first token (which the slow fakes below never send within a test)."""
    params = SamplingParams(max_tokens=4)
    ids = (f"b{next(_BURST_IDS)}" for _ in prompt_lengths)
    return [
        asyncio.create_task(anext(client.generate(rid, [NUM_BYTE_TOKENS] * n, params)))
        for rid, n in zip(ids, prompt_lengths, strict=True)
    ]


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_burst_of_long_and_short_prompts_is_split_by_its_tokens(fakes):
    """An offline run's requests arrive together, faster than any load report: by the number
    of requests alone, long and short prompts taking turns would all land the long ones on
    one batcher (the prompts below: 3,200 tokens against 40), which then prefills for four
    times as long. By tokens, each batcher gets about half of them."""
    first, second = fakes(token_delay_s=30), fakes(token_delay_s=30)
    lengths = [800, 10] * 4

    async def scenario() -> None:
        client = BatcherClient([first.address, second.address], poll_interval_s=30)
        await client.start()
        tasks = _burst(client, lengths)
        try:
            await eventually(lambda: len(first.requests) + len(second.requests) == 8)
            sent = [sum(n for _, n in b.sent) for b in client.batchers]
            assert sent == [sum(len(p) for _, p, _ in f.requests) for f in (first, second)]
        finally:
            await _cancel(tasks)
            await client.close()

    asyncio.run(scenario())
    tokens = [sum(len(p) for _, p, _ in fake.requests) for fake in (first, second)]
    assert sum(tokens) == sum(lengths) and abs(tokens[0] - tokens[1]) <= max(lengths)


def test_a_load_report_replaces_the_count_of_requests_sent_before_it_was_asked_for(fakes):
    """After a poll, the requests sent before it count once, through the batcher's report;
    those sent after it was asked for still count on top of it."""
    first, second = fakes(token_delay_s=30), fakes(token_delay_s=30)

    async def scenario() -> None:
        client = BatcherClient([first.address, second.address], poll_interval_s=30)
        await client.start()
        tasks = _burst(client, [300, 200, 100])
        try:
            await eventually(lambda: len(first.requests) + len(second.requests) == 3)
            await client._poll_all()  # the reports now count all three
            reported = [b.load.num_context_tokens for b in client.batchers]
            assert reported == [300, 300]  # 300 on one, 200 + 100 on the other
            assert [b.score("tokens") for b in client.batchers] == reported
            assert not any(b.sent for b in client.batchers)
            later = _burst(client, [50])
            tasks += later
            await eventually(lambda: len(first.requests) + len(second.requests) == 4)
            scores = [b.score("tokens") for b in client.batchers]
            assert sorted(scores) == [300, 350]
        finally:
            await _cancel(tasks)
            await client.close()

    asyncio.run(scenario())


def test_a_request_sent_while_a_poll_is_out_still_counts_after_its_answer(fakes):
    """The report may have been made before the request arrived: the router keeps counting
    it on top of the report until a poll asked for after it answers."""
    first, second = fakes(token_delay_s=30), fakes(token_delay_s=30)

    async def scenario() -> None:
        client = BatcherClient([first.address, second.address], poll_interval_s=30)
        await client.start()
        first.load_delay_s = second.load_delay_s = 0.3
        poll = asyncio.create_task(client._poll_all())
        await asyncio.sleep(0.05)  # the GetLoad calls are out
        tasks = _burst(client, [100])
        try:
            await eventually(lambda: len(first.requests) + len(second.requests) == 1)
            await poll
            (target,) = [b for b in client.batchers if b.sent]
            assert [n for _, n in target.sent] == [100]
            assert target.score("tokens") == target.load.num_context_tokens + 100
            await client._poll_all()  # asked for after the send: it counts it alone now
            assert not target.sent and target.score("tokens") == 100
        finally:
            await _cancel(tasks)
            await client.close()

    asyncio.run(scenario())


def test_a_refused_request_adds_nothing_to_the_refusing_batchers_load(fakes):
    full, free = fakes(token_delay_s=30), fakes(token_delay_s=30)
    full.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED

    async def scenario() -> None:
        client = BatcherClient([full.address, free.address], poll_interval_s=30)
        await client.start()
        tasks = _burst(client, [100, 100])  # the rotation tries the full one first once
        try:
            await eventually(lambda: len(free.requests) == 2)
            assert len(full.requests) >= 1  # it was asked, and refused
            full_state, free_state = client.batchers
            assert not full_state.sent and [n for _, n in free_state.sent] == [100, 100]
            assert (full_state.sent_tokens, free_state.sent_tokens) == (0, 200)
        finally:
            await _cancel(tasks)
            await client.close()

    asyncio.run(scenario())


def test_beside_a_batcher_that_reports_no_tokens_the_router_counts_requests(fakes):
    """A batcher older than num_context_tokens (a rolling upgrade) would read as empty after
    every poll and take nearly every request: while one is there, routing counts requests."""
    new, old = fakes(token_delay_s=30), fakes(token_delay_s=30)
    old.reports_tokens = False

    async def scenario() -> None:
        client = BatcherClient([new.address, old.address], poll_interval_s=30)
        await client.start()
        assert [b.reports_tokens for b in client.batchers] == [True, False]
        tasks = []
        try:
            for i in range(8):  # one at a time, each counted by a poll before the next
                tasks += _burst(client, [10])
                await eventually(lambda n=i + 1: len(new.requests) + len(old.requests) == n)
                await client._poll_all()
        finally:
            await _cancel(tasks)
            await client.close()

    asyncio.run(scenario())
    assert len(new.requests) == len(old.requests) == 4


def test_a_stop_string_inside_a_merged_chunk_ends_the_output_at_its_token(tokenizer):
    """A chunk carrying several tokens (deltas merged for a router that fell behind): the
    output and its usage end at the token that completed the stop string, as they would
    have one token per chunk."""
    ids = tokenizer.encode("The quick brown fox jumps", add_special_tokens=False)
    texts = [tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
    num_to_stop = next(n for n, text in enumerate(texts) if "brown" in text)
    assert 0 < num_to_stop < len(ids)  # the stop string ends inside the chunk

    class OneChunk:
        def __init__(self):
            self.aborted = []

        async def generate(self, request_id, prompt_ids, params):
            yield GenerateChunk(tuple(ids), tuple(-1.0 for _ in ids), None, None)

        async def abort(self, request_id):
            self.aborted.append(request_id)
            return True

    params = SamplingParams(max_tokens=50)
    request = GenerationInput("r", (1, 2), params, ("brown",))

    client = OneChunk()

    async def deltas() -> list:
        stats = RequestStats(MODEL, time.monotonic(), 2)
        return [d async for d in generate_text(client, tokenizer, request, stats)]

    (delta,) = asyncio.run(deltas())
    assert delta.text == texts[num_to_stop].split("brown")[0] and delta.finish_reason == "stop"
    assert delta.token_ids == tuple(ids[:num_to_stop]) and len(delta.logprobs) == num_to_stop
    assert delta.usage.completion_tokens == num_to_stop
    assert client.aborted == ["r"]
