"""Where windows are defined, and which definition wins.

Three sources, later ones overriding earlier ones by name:

1. built-in: ``offpeak`` (01:00-06:00 UTC, offline work), so a kind declared with
   ``window="offpeak"`` has somewhere to wait even on a fresh deployment;
2. the database (``orchestrator windows add``);
3. the config file's ``[windows.NAME]`` tables: the file is the declared source, so when a name
   is in both the file wins (``windows add`` refuses a name the file declares).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, jobs, utcnow, windows
from orchestrator.errors import (
    AlreadyDefined,
    ConfigurationError,
    InvalidWindow,
    NotDefined,
    UnknownWindow,
    WindowInUse,
)
from orchestrator.settings import Settings
from orchestrator.windows import BUILTIN_WINDOWS, WindowSpec

_CONFIG_KEYS = {"cron", "duration", "duration_s", "timezone", "tiers", "kinds", "slots",
                "price_multiplier", "starts_at", "ends_at"}


def config_windows(config: Mapping[str, Any], source: str = "config file") -> dict[str, WindowSpec]:
    """The ``[windows.NAME]`` tables of a parsed config file, validated.

    Raises:
        ConfigurationError: a table has an unknown key or an invalid value (named).
    """
    section = config.get("windows", {})
    if not isinstance(section, dict):
        raise ConfigurationError(f"{source}: [windows] must be a table of [windows.NAME] tables")
    out: dict[str, WindowSpec] = {}
    for name, table in section.items():
        if not isinstance(table, dict):
            raise ConfigurationError(f"{source}: windows.{name} must be a table")
        unknown = set(table) - _CONFIG_KEYS
        if unknown:
            raise ConfigurationError(
                f"{source}: windows.{name} has unknown key(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_CONFIG_KEYS))}")
        fields = dict(table)
        if "duration_s" in fields:
            fields["duration"] = fields.pop("duration_s")
        try:
            out[name] = WindowSpec.build(name, source="config", **fields)
        except InvalidWindow as e:
            raise ConfigurationError(f"{source}: windows.{name}: {e}") from e
    return out


def _from_row(row: Any) -> WindowSpec:
    return WindowSpec.build(
        row.name, cron=row.cron, duration=row.duration_s, starts_at=row.starts_at,
        ends_at=row.ends_at, timezone=row.timezone, tiers=row.tiers, kinds=row.kinds,
        slots=row.slots, price_multiplier=row.price_multiplier, source="database")


class WindowCatalog:
    """Every defined window, re-read at most every ``ttl_s`` seconds (0: every call)."""

    def __init__(self, engine: Engine, settings: Settings, *, ttl_s: float = 2.0) -> None:
        self.engine = engine
        self.settings = settings
        self.ttl_s = ttl_s
        self._cache: dict[str, WindowSpec] | None = None
        self._loaded = 0.0

    def all(self) -> dict[str, WindowSpec]:
        """Name -> window, after precedence.

        Raises:
            ConfigurationError: the config file's windows are invalid.
        """
        now = time.monotonic()
        if self._cache is None or now - self._loaded >= self.ttl_s:
            merged = dict(BUILTIN_WINDOWS)
            with reading(self.engine) as conn:
                for row in conn.execute(select(windows)):
                    merged[row.name] = _from_row(row)
            merged.update(config_windows(self.settings.config(),
                                         str(self.settings.config_file)))
            self._cache, self._loaded = merged, now
        return self._cache

    def get(self, name: str) -> WindowSpec:
        """Raises: UnknownWindow."""
        found = self.all().get(name)
        if found is None:
            raise UnknownWindow(name, list(self.all()))
        return found

    def invalidate(self) -> None:
        self._cache = None

    # --- the database's windows (the CLI) ----------------------------------------------------

    def add(self, spec: WindowSpec, *, now: datetime | None = None) -> None:
        """Store a window defined from the CLI.

        Raises:
            AlreadyDefined: the name is taken in the database or the config file.
            ConfigurationError: the config file is invalid.
        """
        if spec.name in config_windows(self.settings.config(), str(self.settings.config_file)):
            raise AlreadyDefined(f"window {spec.name!r} is declared in the config file "
                                 f"{self.settings.config_file}; edit it there")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(windows).values(
                    name=spec.name, cron=spec.cron, duration_s=spec.duration_s,
                    starts_at=spec.starts_at, ends_at=spec.ends_at, timezone=spec.timezone,
                    tiers=list(spec.tiers) if spec.tiers else None,
                    kinds=list(spec.kinds) if spec.kinds else None, slots=spec.slots,
                    price_multiplier=spec.price_multiplier, created_at=now or utcnow()))
        except IntegrityError:
            raise AlreadyDefined(f"window {spec.name!r} already exists; remove it first"
                                 ) from None
        self.invalidate()

    def remove(self, name: str) -> None:
        """Delete a CLI-defined window that no unfinished job names.

        Raises:
            NotDefined: no such window in the database (config and built-in windows are not
                removable from the CLI).
            WindowInUse: deferred, queued or running jobs still name it.
        """
        known = self.all()
        with self.engine.begin() as conn:
            exists = conn.execute(select(windows.c.name).where(windows.c.name == name)).first()
            if exists is None:
                where = "the config file" if name in known and \
                    known[name].source == "config" else None
                if where or name in BUILTIN_WINDOWS:
                    raise NotDefined(f"window {name!r} is defined by "
                                     f"{where or 'the built-ins'}, not the CLI; "
                                     "override or edit it in the config file")
                raise NotDefined(f"no window {name!r} was added from the CLI")
            using = conn.execute(
                select(func.count()).select_from(jobs).where(
                    jobs.c.window == name, jobs.c.state.in_(JobState.ACTIVE))
            ).scalar_one()
            if using:
                raise WindowInUse(
                    f"window {name!r} is named by {using} unfinished job(s); cancel them or "
                    "let them finish first")
            conn.execute(delete(windows).where(windows.c.name == name))
        self.invalidate()
