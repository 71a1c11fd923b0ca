"""A tiered workload orchestrator for AI batch and offline work, built on Celery and Redis."""

from orchestrator.client import Client, JobHandle
from orchestrator.errors import (
    InvalidOption,
    InvalidPayload,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    OrchestratorError,
    Overloaded,
    PermanentError,
    QuotaExceeded,
    ServiceUnavailable,
    SubmitInProgress,
    TransientError,
    UnknownKind,
)
from orchestrator.kinds import JobContext, kind
from orchestrator.settings import Settings
from orchestrator.tiers import Tier

__all__ = [
    "Client",
    "InvalidOption",
    "InvalidPayload",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobTimeout",
    "OrchestratorError",
    "Overloaded",
    "PermanentError",
    "QuotaExceeded",
    "ServiceUnavailable",
    "Settings",
    "SubmitInProgress",
    "Tier",
    "TransientError",
    "UnknownKind",
    "kind",
]
