"""``orchestrator scheduler``: APScheduler 3, run only while this process holds the lease.

The main thread takes or renews the lease every third of ``ORCH_SCHEDULER_LEASE_S``. While it
holds it, a ``BackgroundScheduler`` runs with two job stores: ``default`` is APScheduler's
``SQLAlchemyJobStore`` on the orchestrator's database (one persistent job per recurring
schedule, so next run times survive restarts and missed runs coalesce), and ``internal`` is in
memory (the window tick, the reconciler, and the sync of schedules from the ``schedules``
table). A scheduler that loses the lease shuts APScheduler down and waits again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler

from orchestrator.client import Client
from orchestrator.db.store import utcnow
from orchestrator.metrics import SchedulerMetrics
from orchestrator.scheduler.keeper import WindowKeeper
from orchestrator.scheduler.lease import Lease
from orchestrator.scheduler.reconciler import Reconciler
from orchestrator.scheduler.recurring import ScheduleStore, fire
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.transport import Transport
from orchestrator.window_catalog import WindowCatalog

log = logging.getLogger(__name__)

#: APScheduler stores a persistent job's function by reference, with picklable arguments: the
#: job is ``fire_schedule(name)``, which acts through the process that holds the lease.
FIRE_REF = "orchestrator.scheduler.process:fire_schedule"
_acting: SchedulerProcess | None = None


def fire_schedule(name: str) -> None:
    """APScheduler's entry point for a recurring schedule (see ``FIRE_REF``)."""
    process = _acting
    if process is None or not process.lease.held():
        log.warning("schedule %s fired in a process that does not hold the lease; ignored", name)
        return
    process.fire(name)


def schedule_job_id(name: str) -> str:
    return f"schedule:{name}"


class SchedulerProcess:
    """One scheduler: waits for the lease, then runs windows, schedules and the reconciler."""

    def __init__(self, settings: Settings, *, holder: str | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.clock = clock
        self.services = Services.open(settings)
        self.client = Client(self.services)
        self.catalog = WindowCatalog(self.services.engine, settings, ttl_s=1.0)
        self.transport = Transport(self.services)
        self.keeper = WindowKeeper(self.services, self.catalog, self.transport, clock=clock)
        self.reconciler = Reconciler(self.services, self.transport,
                                     grace_s=settings.reconcile_grace_s, clock=clock)
        self.schedules = ScheduleStore(self.services.engine)
        self.lease = Lease(self.services.engine, self.holder, settings.scheduler_lease_s)
        self.acting_since: datetime | None = None
        self._aps: BackgroundScheduler | None = None
        #: set by ``orchestrator scheduler --metrics-port`` (``orchestrator.metrics``)
        self.metrics: SchedulerMetrics | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set: hold (or wait for) the lease and act while holding it."""
        self.catalog.all()  # a broken config file stops the scheduler here, loudly
        log.info("scheduler %s started; waiting for the lease", self.holder)
        try:
            while not stop.is_set():
                try:
                    held = self.lease.acquire()
                except Exception:
                    log.warning("scheduler %s: lease check failed", self.holder, exc_info=True)
                    held = False
                if held and self._aps is None:
                    self._start()
                elif not held and self._aps is not None:
                    log.warning("scheduler %s lost the lease; standing by", self.holder)
                    self._stop()
                stop.wait(self.settings.scheduler_lease_s / 3)
        finally:
            self._stop()
            try:
                self.lease.release()
            finally:
                self.client.close()

    def _start(self) -> None:
        global _acting
        log.info("scheduler %s holds the lease and acts", self.holder)
        aps = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.services.engine,
                                                     tablename="apscheduler_jobs"),
                       "internal": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        now = datetime.now(UTC)
        tick = self.settings.scheduler_tick_s
        aps.add_job(self._guard(self._windows), "interval", seconds=tick, id="windows",
                    jobstore="internal", next_run_time=now)
        aps.add_job(self._guard(self._reconcile), "interval",
                    seconds=self.settings.reconcile_interval_s, id="reconciler",
                    jobstore="internal", next_run_time=now)
        aps.add_job(self._guard(self.sync_schedules), "interval", seconds=max(tick, 1.0),
                    id="schedules", jobstore="internal", next_run_time=now)
        _acting = self
        self.acting_since = now
        self._aps = aps
        if self.metrics is not None:
            self.metrics.acting.set(1)
        aps.start()
        self.sync_schedules()

    def _stop(self) -> None:
        global _acting
        aps, self._aps = self._aps, None
        if aps is not None:
            aps.shutdown(wait=True)
        if _acting is self:
            _acting = None
        self.acting_since = None
        if self.metrics is not None:
            self.metrics.acting.set(0)

    def _windows(self) -> None:
        released = self.keeper.tick()
        if self.metrics is not None:
            self.metrics.released_jobs(released)

    def _reconcile(self) -> None:
        report = self.reconciler.check()
        if self.metrics is not None:
            self.metrics.reconciled(len(report.republished), len(report.taken_over),
                                    len(report.recovered))

    def _guard(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Run a periodic task only under a fresh lease; log (do not raise) its failures."""
        def run() -> None:
            if not self.lease.held():
                return
            try:
                fn()
            except Exception:
                log.exception("scheduler task %s failed", getattr(fn, "__name__", fn))
        return run

    # --- tasks -------------------------------------------------------------------------------

    def fire(self, name: str) -> None:
        fire(self.client, self.schedules, name, self.clock())

    def sync_schedules(self) -> None:
        """Make APScheduler's persistent jobs match the ``schedules`` table."""
        aps = self._aps
        if aps is None:
            return
        wanted = {schedule_job_id(s.name): s for s in self.schedules.all()}
        for job_id, spec in wanted.items():
            trigger = spec.trigger()
            job = aps.get_job(job_id, jobstore="default")
            if job is None:
                aps.add_job(FIRE_REF, trigger=trigger, args=[spec.name], id=job_id,
                            name=f"schedule {spec.name}", jobstore="default",
                            replace_existing=True)
                log.info("schedule %s: cron '%s' %s", spec.name, spec.cron, spec.timezone)
            elif repr(job.trigger) != repr(trigger):
                job.reschedule(trigger)
        for job in aps.get_jobs(jobstore="default"):
            if job.id not in wanted:
                job.remove()
                log.info("schedule job %s removed", job.id)
