"""One scheduler acts at a time: a lease row in the database, renewed, taken over on expiry.

The database (not Redis) holds it because Redis may be flushed, and the scheduler is what
repairs a flushed Redis. A holder that cannot renew in time stops acting (``held`` turns
False on its own clock before the row expires), so two schedulers never both act as long as
their hosts' clocks agree to well within the lease.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, case, or_, select, update

from orchestrator.db.engine import reading
from orchestrator.db.models import scheduler_lease, utcnow
from orchestrator.db.store import _insert_ignore

log = logging.getLogger(__name__)


class Lease:
    """The named lease, as seen by ``holder``."""

    def __init__(self, engine: Engine, holder: str, lease_s: float, *,
                 name: str = "scheduler") -> None:
        self.engine = engine
        self.holder = holder
        self.lease_s = lease_s
        self.name = name
        self._valid_until = 0.0  # monotonic

    def acquire(self, now: datetime | None = None) -> bool:
        """Take the lease if it is free or expired, or renew it if held; True when held."""
        now = now or utcnow()
        started = time.monotonic()
        expires = now + timedelta(seconds=self.lease_s)
        row = scheduler_lease.c
        with self.engine.begin() as conn:
            took = conn.execute(
                update(scheduler_lease)
                .where(and_(row.name == self.name,
                            or_(row.holder == self.holder, row.expires_at < now)))
                .values(holder=self.holder, expires_at=expires,
                        acquired_at=case((row.holder == self.holder, row.acquired_at),
                                         else_=now))
            ).rowcount == 1
            if not took:
                _insert_ignore(conn, scheduler_lease, {"name": self.name, "holder": self.holder,
                                                       "acquired_at": now, "expires_at": expires})
                took = conn.execute(select(row.holder).where(row.name == self.name)
                                    ).scalar_one() == self.holder
        # Stop trusting the lease a little before the row expires.
        self._valid_until = started + self.lease_s * 0.9 if took else 0.0
        return took

    def held(self) -> bool:
        """True while the last successful acquire is still fresh on this process's clock."""
        return time.monotonic() < self._valid_until

    def current(self) -> tuple[str, datetime] | None:
        """``(holder, expires_at)`` of the lease row, if any."""
        with reading(self.engine) as conn:
            found = conn.execute(select(scheduler_lease.c.holder, scheduler_lease.c.expires_at)
                                 .where(scheduler_lease.c.name == self.name)).first()
        return None if found is None else (found.holder, found.expires_at)

    def release(self) -> None:
        """Give the lease up at once (a clean shutdown lets a standby take over now)."""
        self._valid_until = 0.0
        with self.engine.begin() as conn:
            conn.execute(update(scheduler_lease)
                         .where(and_(scheduler_lease.c.name == self.name,
                                     scheduler_lease.c.holder == self.holder))
                         .values(expires_at=utcnow() - timedelta(seconds=1)))
