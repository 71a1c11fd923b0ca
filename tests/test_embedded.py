"""The embedded default's private Redis: one server per state dir, stopped by its last user."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from orchestrator.embedded import EmbeddedRedis


def test_processes_share_one_server_and_the_last_to_leave_stops_it(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.attach()
    client = redis.Redis(unix_socket_path=str(first.socket))
    client.set("shared", "yes")
    # Another process attaches to the same server, sees the data, and leaves: it keeps running.
    script = textwrap.dedent(f"""
        import redis
        from orchestrator.embedded import EmbeddedRedis
        e = EmbeddedRedis(__import__("pathlib").Path({str(tmp_path)!r}))
        e.attach()
        print(redis.Redis(unix_socket_path=str(e.socket)).get("shared").decode())
        e.detach()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "yes", out.stderr
    assert client.ping()
    client.close()
    first.detach()
    assert not first.socket.exists()


def test_a_crashed_user_does_not_keep_the_server_alive(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from orchestrator.embedded import EmbeddedRedis
        EmbeddedRedis(__import__("pathlib").Path({str(tmp_path)!r})).attach()
        os._exit(0)  # no detach: the kernel drops its lock
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parent.parent)
    mine = EmbeddedRedis(tmp_path)
    mine.attach()  # reuses the running server
    assert redis.Redis(unix_socket_path=str(mine.socket)).ping()
    mine.detach()  # and, being the only user left, stops it
    assert not mine.socket.exists()


def test_a_failed_start_leaves_the_process_free_to_attach_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.embedded as embedded
    from orchestrator.errors import ServiceUnavailable

    server = EmbeddedRedis(tmp_path)
    real = embedded._redis_server_binary
    monkeypatch.setattr(embedded, "_redis_server_binary", lambda: str(tmp_path / "missing"))
    with pytest.raises(ServiceUnavailable, match="cannot start"):
        server.attach()
    monkeypatch.setattr(embedded, "_redis_server_binary", real)
    server.attach()  # it returned at once, counted as attached, with no server behind it
    try:
        assert redis.Redis(unix_socket_path=str(server.socket)).ping()
    finally:
        server.detach()
