"""A real redis-server that a test may kill, freeze (SIGSTOP) and bring back."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from broker.devstack.processes import ManagedProcess
from broker.devstack.redis_server import start_redis


class FaultyRedis:
    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self.proc: ManagedProcess = start_redis(workdir)
        self.port = self.proc.port
        self._frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """Dies at once, as on a crash or an OOM kill: no goodbye to its clients."""
        self.thaw()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.proc.pid, signal.SIGKILL)
        self.proc.proc.wait(5)
        self.proc.stop()

    def freeze(self) -> None:
        """Stops answering but keeps its sockets: the kernel still accepts connections,
        nothing replies (a hung or paused host)."""
        os.kill(self.proc.proc.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen:
            os.kill(self.proc.proc.pid, signal.SIGCONT)
            self._frozen = False

    def fault(self, kind: str) -> None:
        {"kill": self.kill, "freeze": self.freeze}[kind]()

    def restore(self) -> None:
        """Answering again, on the same port (empty after a kill)."""
        self.thaw()
        if self.proc.proc.poll() is not None:
            self.proc = start_redis(self._workdir, port=self.port)

    def stop(self) -> None:
        self.thaw()
        self.proc.stop()
