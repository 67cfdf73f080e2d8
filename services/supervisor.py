"""One supervised `alignedserve serve ROLE` child process of `alignedserve serve`: started,
restarted whenever it exits, and on stop given SIGTERM and time to drain."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Set in a supervised child's environment: the pid of the `serve` that supervises it.
PARENT_ENV = "ALIGNEDSERVE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_parent() -> None:
    """In a supervised child, first thing: SIGTERM (its drain) once the supervising `serve`
    is gone, however it went (Linux). Without it, a `serve` killed by SIGKILL or the OOM
    killer would leave its batcher and worker running, holding their ports and memory."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("cannot follow the supervising serve: errno %d", ctypes.get_errno())
    elif os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Keeps one `alignedserve serve ROLE` child running until told to stop; on stop, SIGTERM
    and up to `stop_timeout_s` for it to drain and exit before a SIGKILL. The child gets `env`
    (None: this process's environment); `on_exit` is called with each child's pid once it has
    exited (restarted or stopped)."""

    def __init__(
        self,
        role: str,
        args: list[str],
        stop_timeout_s: float = 10.0,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ):
        self.role = role
        self.args = args
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self.on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cmd = [sys.executable, "-m", "alignedserve", "serve", self.role, *self.args]
            env = {**(os.environ if self.env is None else self.env), PARENT_ENV: str(os.getpid())}
            self.process = await asyncio.create_subprocess_exec(*cmd, env=env)
            exited = asyncio.create_task(self.process.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                exited.cancel()
                await self._terminate()
                self._exited()
                return
            stopping.cancel()
            self._exited()
            self.restarts += 1
            log.warning("%s exited (%s): restarting it", self.role, self.process.returncode)
            await asyncio.sleep(0.5)

    def _exited(self) -> None:
        if self.on_exit is not None and self.process is not None:
            self.on_exit(self.process.pid)

    async def _terminate(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), self.stop_timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
