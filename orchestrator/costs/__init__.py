"""Cost per job: the price table, charging finished jobs, and cost reports."""

from orchestrator.costs.charge import Accountant, Charge, default_models, job_model
from orchestrator.costs.prices import QUANTUM, ModelPrice, PriceTable, round_money

__all__ = ["QUANTUM", "Accountant", "Charge", "ModelPrice", "PriceTable", "default_models",
           "job_model", "round_money"]
