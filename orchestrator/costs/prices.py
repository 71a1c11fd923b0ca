"""The price table: what a CPU-hour costs in each tier, and optional per-model prices.

Declared in the ``[prices]`` section of the deployment's config file (``ORCH_CONFIG``, else
``<state dir>/orchestrator.toml``); every key is optional and falls back to ``DEFAULTS``::

    [prices]
    currency = "USD"                # a label for reports

    [prices.cpu_hour]               # per tier: one CPU-hour of a worker slot
    interactive = "0.12"
    nearline = "0.06"
    offline = "0.03"

    [prices.wall_hour]              # per tier: one wall-clock hour of a slot (default 0)
    offline = "0.01"

    [prices.models."all-MiniLM-L6-v2"]
    per_1k_items = "0.004"          # per 1,000 items the job produced (texts, rows)

Prices are decimal money: write them as strings (``"0.12"``) or TOML numbers, which are read
through their shortest decimal spelling (``0.12`` is 0.12, not the nearest binary float).

The rounding rule (``round_money``): each attempt's compute charge and each job's item charge
is rounded once, half to even, to ``QUANTUM`` (1e-8, the scale of the ``cost`` columns); a
job's cost is the exact sum of those, so the stored job costs add up exactly to any total.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from orchestrator.errors import ConfigurationError
from orchestrator.tiers import TIER_ORDER, Tier

#: The smallest unit of money the orchestrator stores (the ``cost`` columns' scale).
QUANTUM = Decimal("0.00000001")
#: Largest price accepted (also keeps every stored cost inside Numeric(18, 8)).
MAX_PRICE = Decimal("1000000")
SECONDS_PER_HOUR = Decimal(3600)

#: Prices when the config file says nothing: reserved interactive capacity costs most per
#: CPU-hour, offline capacity (cheap, deferrable) least; wall time and items are free.
DEFAULT_CPU_HOUR: Mapping[Tier, Decimal] = {
    Tier.INTERACTIVE: Decimal("0.12"),
    Tier.NEARLINE: Decimal("0.06"),
    Tier.OFFLINE: Decimal("0.03"),
}
DEFAULT_CURRENCY = "USD"


def round_money(value: Decimal) -> Decimal:
    """Round to ``QUANTUM``, half to even (the one rounding rule for stored costs)."""
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class ModelPrice:
    """A per-model price per 1,000 items the job produced."""

    per_1k_items: Decimal = Decimal(0)


@dataclass(frozen=True)
class PriceTable:
    """Prices per tier and per model; see the module docstring for the config format."""

    cpu_hour: Mapping[Tier, Decimal] = field(default_factory=lambda: dict(DEFAULT_CPU_HOUR))
    wall_hour: Mapping[Tier, Decimal] = field(
        default_factory=lambda: {tier: Decimal(0) for tier in TIER_ORDER})
    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    currency: str = DEFAULT_CURRENCY

    def compute_charge(self, tier: str, cpu_seconds: float | None, wall_seconds: float | None,
                       multiplier: Decimal | None) -> Decimal:
        """What one attempt's compute costs, rounded (NULL seconds or multiplier: 0 and 1)."""
        scale = Decimal(1) if multiplier is None else Decimal(multiplier)
        return round_money(self.unscaled_charge(tier, cpu_seconds, wall_seconds) * scale)

    def unscaled_charge(self, tier: str, cpu_seconds: float | None,
                        wall_seconds: float | None) -> Decimal:
        """One attempt's compute at the tier's prices, before its window multiplier and
        unrounded (the database applies both when it finishes a job in one statement)."""
        t = Tier(tier)
        cpu = _seconds(cpu_seconds) * self.cpu_hour[t]
        wall = _seconds(wall_seconds) * self.wall_hour[t]
        return (cpu + wall) / SECONDS_PER_HOUR

    def item_charge(self, model: str | None, items: int) -> Decimal:
        """What the items a job produced cost under its model's price, rounded."""
        price = self.models.get(model) if model is not None else None
        if price is None or items <= 0:
            return Decimal(0)
        return round_money(price.per_1k_items * items / 1000)

    def to_json(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "cpu_hour": {t.value: str(self.cpu_hour[t]) for t in TIER_ORDER},
            "wall_hour": {t.value: str(self.wall_hour[t]) for t in TIER_ORDER},
            "models": {name: {"per_1k_items": str(p.per_1k_items)}
                       for name, p in sorted(self.models.items())},
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PriceTable:
        """The price table of a parsed config file (its ``[prices]`` section, if any).

        Raises:
            ConfigurationError: a key is unknown or a price is not a decimal in
                ``[0, MAX_PRICE]``; the message names the key.
        """
        section = config.get("prices", {})
        if not isinstance(section, Mapping):
            raise ConfigurationError("prices: must be a table ([prices])")
        _known(section, {"currency", "cpu_hour", "wall_hour", "models"}, "prices")
        currency = section.get("currency", DEFAULT_CURRENCY)
        if not isinstance(currency, str) or not 0 < len(currency) <= 16:
            raise ConfigurationError("prices.currency: must be a short text, e.g. \"USD\"")
        cpu_hour = dict(DEFAULT_CPU_HOUR)
        cpu_hour.update(_per_tier(section.get("cpu_hour", {}), "prices.cpu_hour"))
        wall_hour = {tier: Decimal(0) for tier in TIER_ORDER}
        wall_hour.update(_per_tier(section.get("wall_hour", {}), "prices.wall_hour"))
        models_section = section.get("models", {})
        if not isinstance(models_section, Mapping):
            raise ConfigurationError("prices.models: must be a table of models")
        models: dict[str, ModelPrice] = {}
        for name, entry in models_section.items():
            where = f"prices.models.{name}"
            if not isinstance(entry, Mapping):
                raise ConfigurationError(f"{where}: must be a table, e.g. per_1k_items = \"0.004\"")
            _known(entry, {"per_1k_items"}, where)
            models[str(name)] = ModelPrice(
                per_1k_items=_price(entry.get("per_1k_items", 0), f"{where}.per_1k_items"))
        return cls(cpu_hour=cpu_hour, wall_hour=wall_hour, models=models, currency=currency)


def _seconds(value: float | None) -> Decimal:
    if value is None or value != value or value <= 0:  # NULL, NaN or nothing measured
        return Decimal(0)
    return Decimal(repr(float(value)))


def _known(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigurationError(
                f"{where}.{key}: unknown key; {where} takes {', '.join(sorted(allowed))}")


def _per_tier(section: Any, where: str) -> dict[Tier, Decimal]:
    if not isinstance(section, Mapping):
        raise ConfigurationError(f"{where}: must be a table of tiers, e.g. offline = \"0.03\"")
    _known(section, {t.value for t in TIER_ORDER}, where)
    return {Tier(name): _price(value, f"{where}.{name}") for name, value in section.items()}


def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigurationError(f"{where}: {value!r} is not a price; write e.g. \"0.12\"")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise ConfigurationError(f"{where}: {value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise ConfigurationError(f"{where}: {value!r} must be between 0 and {MAX_PRICE}")
    return price
