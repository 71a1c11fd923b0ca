"""How long one submit takes before its job is in its buffer, alone and beside busy cores.

    .venv/bin/python bench/submit_latency.py [--rate 70] [--threads 4] [--burners 0,2]

The open loop of ``bench/batching.py`` counts a job's time in queue from the start of its
submit, so the submit's own latency (the admission check, the INSERT and its commit, the push
onto the batch buffer: three round trips) is part of every job's wait. This measures it with
no worker at all: single-text ``embed`` submits at Poisson arrivals (``--rate`` a second from
``--threads`` threads) for ``--seconds``, first on otherwise idle cores, then beside
``--burners`` processes that each spin one core (what two busy worker slots leave the client,
PostgreSQL and Redis), optionally under a scheduling policy (``--burner-policy idle`` runs them
``SCHED_IDLE``: anything else that wakes preempts them). Needs Redis on 127.0.0.1:6379 (DB 11,
flushed) and PostgreSQL on 127.0.0.1:5432 (a throwaway database). Writes
``bench/results/submit_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import throwaway_database  # noqa: E402
from bench.report import machine_info  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

TEXT = "a short sentence of about thirty two tokens " * 3
SPIN = "while True: pass"


def _burners(n: int, policy: str) -> list[subprocess.Popen[bytes]]:
    prefix = [] if policy == "normal" else ["chrt", f"--{policy}", "0"]
    return [subprocess.Popen([*prefix, sys.executable, "-c", SPIN]) for _ in range(n)]


def _submit(client: Client, tenant: str) -> None:
    client.submit("embed", {"texts": [TEXT], "model": "all-MiniLM-L6-v2"}, tier="interactive",
                  tenant=tenant)


def measure(client: Client, *, rate: float, threads: int, seconds: float, seed: int
            ) -> dict[str, Any]:
    """Submits at Poisson arrivals; percentiles (ms) of each submit's wall time."""
    times = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, int(rate * seconds)))
    took = np.zeros(len(times))
    late = np.zeros(len(times))
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.2

    def part(k: int) -> None:
        for i in range(k, len(times), threads):
            wait = start + times[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            began = time.perf_counter()
            late[i] = began - start - times[i]
            _submit(client, "lat")
            took[i] = time.perf_counter() - began

    workers = [threading.Thread(target=part, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ms = took * 1000
    return {"submits": len(times),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)},
            "max_ms": round(float(ms.max()), 2),
            "client_cpu_ms_per_submit": round((time.process_time() - cpu0) * 1000 / len(times), 3),
            "late_p99_ms": round(float(np.percentile(late * 1000, 99)), 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=70.0, help="submits a second")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--burners", default="0,2", help="spinning processes, one run each")
    p.add_argument("--burner-policy", default="normal", choices=["normal", "batch", "idle"])
    p.add_argument("--loop", type=int, default=3000, help="back-to-back submits, for the floor")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python bench/submit_latency.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(), "config": {k: str(v) for k, v in vars(args).items()},
        "runs": []}
    with tempfile.TemporaryDirectory() as tmp, throwaway_database(args.postgres) as url:
        settings = Settings.from_env({"ORCH_DATABASE_URL": url, "ORCH_BROKER_URL": args.redis,
                                      "ORCH_STATE_DIR": tmp})
        r = redis.Redis.from_url(args.redis)
        r.flushdb()
        client = Client.from_settings(settings)
        try:
            for _ in range(200):  # warm: connections, prepared statements, the quota cache
                _submit(client, "lat")
            began, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(args.loop):
                _submit(client, "lat")
            report["back_to_back"] = {
                "submits": args.loop,
                "wall_ms_per_submit": round((time.perf_counter() - began) * 1000 / args.loop, 3),
                "client_cpu_ms_per_submit":
                    round((time.process_time() - cpu0) * 1000 / args.loop, 3)}
            print(f"back to back: {report['back_to_back']}", flush=True)
            for n in (int(x) for x in args.burners.split(",") if x):
                burners = _burners(n, args.burner_policy)
                try:
                    time.sleep(0.5)
                    run = measure(client, rate=args.rate, threads=args.threads,
                                  seconds=args.seconds, seed=n)
                finally:
                    for b in burners:
                        b.kill()
                        b.wait()
                run = {"burners": n, "burner_policy": args.burner_policy if n else None, **run}
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
                r.flushdb()
        finally:
            client.close()
            r.flushdb()
            r.close()
    report["loadavg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "submit_latency.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
