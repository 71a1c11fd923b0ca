"""Worker processes of a local deployment, started and stopped from Python.

Used by ``orchestrator demo``, the end-to-end tests and the benchmarks: each worker is a real
``orchestrator worker`` process in its own process group, configured by the same settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator.errors import ServiceUnavailable
from orchestrator.settings import Settings


class LocalWorker:
    """One ``orchestrator worker`` process; its output goes to ``log``; ``args`` are more
    ``orchestrator worker`` options (e.g. ``--metrics-port``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        tiers: str,
        concurrency: int,
        name: str,
        log: Path,
        loglevel: str = "INFO",
        extra_env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parent.parent
        # The worker's settings are exactly these: an ORCH_* variable of this process that
        # they do not set (a database URL, a tier override) must not reach the child.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env = {**inherited, **settings.to_env(), **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "worker", "--tiers", tiers,
                 "--concurrency", str(concurrency), "--loglevel", loglevel, "--hostname", name,
                 *args],
                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 60) -> LocalWorker:
        """Block until Celery reports the worker ready (needs loglevel INFO).

        Raises:
            ServiceUnavailable: the worker exited or was not ready in time (its output attached).
        """
        deadline = time.monotonic() + timeout
        while " ready." not in self.output():
            if self.proc.poll() is not None:
                raise ServiceUnavailable(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"worker {self.name} not ready after {timeout:g}s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def children(self) -> list[int]:
        """PIDs of the worker's pool processes."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the main process and its pool: no chance to clean up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int | None:
        """Warm shutdown (SIGTERM: finish running tasks), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
