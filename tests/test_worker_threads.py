"""A GPU worker runs torch with one CPU thread unless OMP_NUM_THREADS says otherwise
(worker/server.py: limit_cpu_threads)."""

from __future__ import annotations

import pytest
import torch

from alignedserve.worker.server import limit_cpu_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_when_nothing_says_otherwise(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_cpu_threads()
    assert torch.get_num_threads() == 1


def test_omp_num_threads_is_left_to_decide(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    limit_cpu_threads()
    assert torch.get_num_threads() == 2
