"""CpuKVPool: a shared-memory segment of KV blocks that a second process maps by name.

The cross-process tests run real child processes (`sys.executable`). They wait on the child's
stderr reaching EOF (`communicate()`), not just on the child: a Python resource tracker the
child started inherits its stderr, so EOF means that tracker has exited too and has done any
clean-up it was going to do. That is what makes "the segment survived the worker" a real check
(see test_control_plain_sharedmemory_attach_destroys_segment for the failure it guards against).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

from alignedserve.batcher import kv_pool as kv_pool_module
from alignedserve.batcher.kv_pool import NAME_PREFIX, CpuKVPool, PoolSegment
from alignedserve.common.errors import ConfigError, OutOfBlocksError
from alignedserve.common.kv_layout import KVLayout

# 2 layers x (K, V) x 4 tokens x 2 heads x 8 dims x fp16 = 512 bytes a block
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
BLOCK_BYTES = 512
NUM_BLOCKS = 16
CHILD_TIMEOUT_S = 60

# Shared by the test and the child processes: the byte pattern written into a block.
PATTERN_SRC = """
import numpy as np
def pattern(seed, n):
    return ((np.arange(n, dtype=np.uint32) * 7 + seed * 131 + 1) % 256).astype(np.uint8)
"""
_ns: dict = {}
exec(PATTERN_SRC, _ns)
pattern = _ns["pattern"]

LAYOUT_SRC = (
    "from alignedserve.common.kv_layout import KVLayout\n"
    "LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, "
    "dtype='float16')\n"
)


def unique_name() -> str:
    return f"{NAME_PREFIX}t{uuid.uuid4().hex[:10]}"


def run_child(body: str, *args: str, **popen_kw) -> subprocess.Popen:
    src = PATTERN_SRC + LAYOUT_SRC + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", src, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kw,
    )


def fill(pool: CpuKVPool) -> None:
    for i in range(pool.num_blocks):
        pool.block(i)[:] = pattern(i, BLOCK_BYTES)


def assert_filled(pool: CpuKVPool, skip: tuple[int, ...] = ()) -> None:
    for i in range(pool.num_blocks):
        if i not in skip:
            np.testing.assert_array_equal(pool.block(i), pattern(i, BLOCK_BYTES))


@pytest.fixture
def pool():
    p = CpuKVPool.create(LAYOUT, NUM_BLOCKS)
    yield p
    # dropping its views is the test's job; the segment is unlinked even if close() fails
    try:
        p.close()
    finally:
        p.unlink()


def test_layout_block_bytes_is_what_the_tests_assume():
    assert LAYOUT.block_bytes == BLOCK_BYTES


# ---------------------------------------------------------------- cross-process


def test_second_process_reads_owner_blocks_and_owner_sees_its_write(pool):
    assert pool.name.startswith(NAME_PREFIX)
    fill(pool)
    child = run_child(
        """
        import sys
        from alignedserve.batcher.kv_pool import CpuKVPool
        name, n, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        p = CpuKVPool.attach(name, LAYOUT, n)
        assert not p.is_owner and p.allocator is None
        bad = [i for i in range(n) if not (p.block(i) == pattern(i, p.block_bytes)).all()]
        p.block(target)[:] = pattern(1000, p.block_bytes)
        print("mismatched", bad)
        del bad
        p.close()
        """,
        pool.name,
        str(NUM_BLOCKS),
        "5",
    )
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err
    assert out.strip() == "mismatched []"
    np.testing.assert_array_equal(pool.block(5), pattern(1000, BLOCK_BYTES))
    assert_filled(pool, skip=(5,))


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_segment_outlives_attached_worker(pool, how):
    fill(pool)
    child = run_child(
        """
        import sys, time
        from alignedserve.batcher.kv_pool import CpuKVPool
        name, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        p = CpuKVPool.attach(name, LAYOUT, n)
        v = p.block(3)
        v[:] = pattern(77, p.block_bytes)
        print("ready", flush=True)
        if how == "sigkill":
            time.sleep(120)  # killed here, view and mapping still alive
        """,
        pool.name,
        str(NUM_BLOCKS),
        how,
    )
    assert child.stdout.readline().strip() == "ready"
    if how == "sigkill":
        child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=CHILD_TIMEOUT_S)  # EOF: child AND any tracker it had
    if how == "sigkill":
        assert child.returncode == -signal.SIGKILL
    else:
        assert child.returncode == 0, err
    assert "leaked" not in err, err
    if os.path.isdir("/dev/shm"):
        assert os.path.exists(f"/dev/shm/{pool.name}")
    # the owner still holds the data, and a fresh worker can still attach by name
    np.testing.assert_array_equal(pool.block(3), pattern(77, BLOCK_BYTES))
    assert_filled(pool, skip=(3,))
    again = CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS)
    np.testing.assert_array_equal(again.block(3), pattern(77, BLOCK_BYTES))
    again.close()


def test_control_plain_sharedmemory_attach_destroys_segment(pool):
    """The failure CpuKVPool.attach avoids (CPython bpo-39959): a child that attaches with a
    plain SharedMemory unlinks the owner's segment when it exits. Proves the survival test
    above can fail; also checks the owner's unlink() copes with a segment already gone."""
    child = run_child(
        """
        import sys
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(name=sys.argv[1])
        shm.close()
        """,
        pool.name,
    )
    _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err
    assert "leaked shared_memory" in err
    with pytest.raises(FileNotFoundError):
        CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS)
    pool.close()
    pool.unlink()  # the name is gone already: must not raise


OWNER_SCRIPT = """
import multiprocessing as mp
import os
import sys

import numpy as np

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.kv_layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")


def worker(name, n):
    p = CpuKVPool.attach(name, LAYOUT, n)
    p.block(2)[:] = 42
    p.close()


if __name__ == "__main__":
    how = sys.argv[1]
    pool = CpuKVPool.create(LAYOUT, 8)
    print(pool.name, flush=True)
    proc = mp.get_context("spawn").Process(target=worker, args=(pool.name, 8))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    assert (pool.block(2) == 42).all() and (pool.block(1) == 0).all()
    if how == "crash":
        os._exit(0)  # no close, no unlink: the owner's resource tracker must clean up
    pool.close()
    pool.unlink()
    print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["unlink", "crash"])
def test_spawned_worker_shares_tracker_without_breaking_owner(tmp_path, how):
    """A worker started with multiprocessing shares the owner's resource tracker. Its attach
    must not touch the owner's registration: the owner's unlink must not make the tracker
    print a KeyError, and an owner that dies without unlinking must still get its segment
    removed by the tracker (no leak in /dev/shm)."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), how],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )  # run() reads to EOF: the tracker (inherits stderr) has exited as well
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.split()[0]
    assert name.startswith(NAME_PREFIX)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "KeyError" not in proc.stderr, proc.stderr
    if how == "unlink":
        assert proc.stdout.split()[1] == "done"
        assert "leaked" not in proc.stderr, proc.stderr
    else:
        assert "leaked shared_memory" in proc.stderr, proc.stderr
    with pytest.raises(FileNotFoundError):
        CpuKVPool.attach(name, LAYOUT, 8)


def test_importing_kv_pool_does_not_import_torch():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, alignedserve.batcher.kv_pool; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- allocation


def test_allocate_and_free_through_the_pool(pool):
    assert pool.is_owner and pool.allocator is not None
    assert (pool.num_free, pool.num_used, pool.usage) == (NUM_BLOCKS, 0, 0.0)
    a = pool.allocate(4)
    b = pool.allocate(12)
    assert len(a) == 4 and len(b) == 12
    assert sorted(a + b) == list(range(NUM_BLOCKS))
    assert pool.num_free == 0 and pool.usage == 1.0
    pool.free(a)
    assert pool.num_free == 4 and pool.usage == pytest.approx(12 / 16)
    assert sorted(pool.allocate(4)) == sorted(a)  # freed blocks come back
    with pytest.raises(ValueError):
        pool.free([NUM_BLOCKS])  # never a valid index


def test_allocate_beyond_capacity_raises_and_leaves_state_unchanged(pool):
    held = pool.allocate(10)
    with pytest.raises(OutOfBlocksError, match="asked for 7 KV blocks, 6 free"):
        pool.allocate(7)
    assert pool.num_free == 6 and not pool.can_allocate(7) and pool.can_allocate(6)
    rest = pool.allocate(6)
    assert sorted(held + rest) == list(range(NUM_BLOCKS))


def test_attached_pool_cannot_allocate(pool):
    att = CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS)
    try:
        assert att.allocator is None and not att.is_owner
        for op in (
            lambda: att.allocate(1),
            lambda: att.free([0]),
            lambda: att.num_free,
            lambda: att.usage,
            att.unlink,
        ):
            with pytest.raises(RuntimeError, match="only the owner"):
                op()
        assert pool.num_free == NUM_BLOCKS  # nothing leaked into the owner's allocator
    finally:
        att.close()


# ---------------------------------------------------------------- sizes and errors


def test_create_bytes_block_count():
    with CpuKVPool.create_bytes(LAYOUT, 5 * BLOCK_BYTES + BLOCK_BYTES - 1) as p:
        assert p.num_blocks == 5
        assert p.nbytes == 5 * BLOCK_BYTES
        assert p.blocks().shape == (5, BLOCK_BYTES)
        assert p.num_free == 5
    with CpuKVPool.create_bytes(LAYOUT, BLOCK_BYTES) as p:
        assert p.num_blocks == 1


def test_create_bytes_below_one_block_is_a_config_error():
    name = unique_name()
    with pytest.raises(ConfigError, match=rf"pool_bytes={BLOCK_BYTES - 1}.*{BLOCK_BYTES} bytes"):
        CpuKVPool.create_bytes(LAYOUT, BLOCK_BYTES - 1, name=name)
    with pytest.raises(FileNotFoundError):  # nothing was created
        CpuKVPool.attach(name, LAYOUT, 1)


def test_a_reserved_segment_is_cut_to_the_whole_blocks_a_worker_attaches_to():
    """Reserved before the layout is known, then carved: the segment shrinks to its whole
    blocks (the size a worker's attach checks) and they read and write as any pool's."""
    name = unique_name()
    segment = PoolSegment.reserve(3 * BLOCK_BYTES + BLOCK_BYTES // 2, name=name)
    assert os.stat(f"/dev/shm/{name}").st_size == 3 * BLOCK_BYTES + BLOCK_BYTES // 2
    with segment.carve(LAYOUT) as owner:
        assert (owner.num_blocks, owner.nbytes) == (3, 3 * BLOCK_BYTES)
        assert os.stat(f"/dev/shm/{name}").st_size == 3 * BLOCK_BYTES
        with CpuKVPool.attach(name, LAYOUT, 3) as worker:
            owner.block(2)[:] = 7
            assert (worker.block(2) == 7).all()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_reserved_segment_that_holds_no_block_is_removed():
    name = unique_name()
    segment = PoolSegment.reserve(BLOCK_BYTES - 1, name=name)
    with pytest.raises(ConfigError, match=rf"pool_bytes={BLOCK_BYTES - 1} holds no KV block"):
        segment.carve(LAYOUT)
    assert not os.path.exists(f"/dev/shm/{name}")
    name = unique_name()
    PoolSegment.reserve(BLOCK_BYTES, name=name).discard()  # never carved
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_create_rejects_bad_num_blocks(bad):
    with pytest.raises(ConfigError, match="num_blocks"):
        CpuKVPool.create(LAYOUT, bad)


def test_attach_with_wrong_size_is_a_config_error(pool):
    with pytest.raises(ConfigError, match=rf"{NUM_BLOCKS * BLOCK_BYTES} bytes.*num_blocks=15"):
        CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS - 1)
    other = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
    with pytest.raises(ConfigError, match="does not match"):
        CpuKVPool.attach(pool.name, other, NUM_BLOCKS)
    with pytest.raises(FileNotFoundError):
        CpuKVPool.attach(unique_name(), LAYOUT, NUM_BLOCKS)


def test_create_with_an_existing_name_fails(pool):
    with pytest.raises(FileExistsError):
        CpuKVPool.create(LAYOUT, NUM_BLOCKS, name=pool.name)
    pool.block(0)[:] = 9  # the existing segment is untouched and still usable
    assert (pool.blocks()[0] == 9).all()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a /dev/shm mount")
@pytest.mark.parametrize("precheck", [True, False])
def test_pool_larger_than_dev_shm_is_a_config_error(monkeypatch, precheck):
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    num_blocks = total // BLOCK_BYTES + 1  # more than the whole mount: fails without filling it
    if not precheck:  # skip the free-space check: posix_fallocate must catch it
        monkeypatch.setattr(kv_pool_module, "_shm_free_bytes", lambda: None)
    name = unique_name()
    with pytest.raises(ConfigError) as info:
        CpuKVPool.create(LAYOUT, num_blocks, name=name)
    msg = str(info.value)
    assert f"{num_blocks * BLOCK_BYTES} bytes" in msg
    assert "/dev/shm" in msg and "too small" in msg
    with pytest.raises(FileNotFoundError):  # no half-made segment left behind
        CpuKVPool.attach(name, LAYOUT, num_blocks)


# ---------------------------------------------------------------- views and lifetime


def test_block_views_are_zero_copy(pool):
    all_blocks = pool.blocks()
    assert all_blocks.dtype == np.uint8 and all_blocks.shape == (NUM_BLOCKS, BLOCK_BYTES)
    b7 = pool.block(7)
    assert b7.shape == (BLOCK_BYTES,)
    b7[:] = pattern(7, BLOCK_BYTES)
    np.testing.assert_array_equal(all_blocks[7], pattern(7, BLOCK_BYTES))
    all_blocks[8, :] = 200
    assert (pool.block(8) == 200).all()
    assert (all_blocks[6] == 0).all() and (all_blocks[9] == 0).all()  # neighbours untouched
    assert np.shares_memory(b7, all_blocks)
    # a second mapping of the same segment in this process sees the same bytes
    att = CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS)
    np.testing.assert_array_equal(att.block(7), pattern(7, BLOCK_BYTES))
    att.block(9)[:] = 1
    assert (all_blocks[9] == 1).all()
    del b7, all_blocks
    att.close()


def test_block_index_out_of_range(pool):
    for bad in (-1, NUM_BLOCKS):
        with pytest.raises(IndexError, match="out of range"):
            pool.block(bad)


def test_close_with_live_view_raises_then_succeeds_after_dropping_it():
    p = CpuKVPool.create(LAYOUT, 4)
    try:
        view = p.block(1)
        view[:] = 5
        with pytest.raises(BufferError, match="views of it are alive"):
            p.close()
        assert not p.closed
        assert (view == 5).all()  # the caller's view still works
        with pytest.raises(ValueError, match="closed"):
            p.blocks()  # but no new views
        del view
        p.close()
        assert p.closed
        p.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            p.block(0)
    finally:
        p.unlink()
        p.unlink()  # idempotent


def test_context_manager_closes_and_unlinks():
    with CpuKVPool.create(LAYOUT, 4) as p:
        name = p.name
        p.block(0)[:] = 1
        att = CpuKVPool.attach(name, LAYOUT, 4)
        att.close()
    assert p.closed
    with pytest.raises(FileNotFoundError):
        CpuKVPool.attach(name, LAYOUT, 4)
    if os.path.isdir("/dev/shm"):
        assert not os.path.exists(f"/dev/shm/{name}")


def test_attached_context_manager_closes_but_keeps_segment(pool):
    pool.block(0)[:] = 3
    with CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS) as att:
        assert (att.block(0) == 3).all()
    assert att.closed
    again = CpuKVPool.attach(pool.name, LAYOUT, NUM_BLOCKS)  # still there
    assert (again.block(0) == 3).all()
    again.close()
