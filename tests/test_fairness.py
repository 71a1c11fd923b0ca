"""Fair turns between tenants' bulk work inside a tier (weighted round robin over chunks)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

from orchestrator import Client
from orchestrator.broker import queue_key
from orchestrator.fairness import FairDispatcher
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.runtime import Runtime


def _dispatcher(client: Client, window: int) -> FairDispatcher:
    return FairDispatcher(client.services.redis, client.services.celery, window=window)


def test_equal_tenants_take_turns_whatever_order_they_came_in(client: Client) -> None:
    fair = _dispatcher(client, window=1)
    policy = client.settings.policy(Tier.OFFLINE)
    fair.enqueue(Tier.OFFLINE, "big", 1, [f"big-{i}" for i in range(10)])
    fair.enqueue(Tier.OFFLINE, "small", 1, ["small-0", "small-1"])
    order = fair.dispatch(Tier.OFFLINE, policy)
    while len(order) < 12:
        order += fair.dispatch(Tier.OFFLINE, policy, released=order[-1])
    assert order[:4] in (["big-0", "small-0", "big-1", "small-1"],
                         ["small-0", "big-0", "small-1", "big-1"])
    assert order[4:] == [f"big-{i}" for i in range(2, 10)]


def test_weights_give_proportional_turns(client: Client) -> None:
    fair = _dispatcher(client, window=1)
    policy = client.settings.policy(Tier.OFFLINE)
    fair.enqueue(Tier.OFFLINE, "gold", 2, [f"g{i}" for i in range(20)])
    fair.enqueue(Tier.OFFLINE, "std", 1, [f"s{i}" for i in range(20)])
    order = fair.dispatch(Tier.OFFLINE, policy)
    while len(order) < 12:
        order += fair.dispatch(Tier.OFFLINE, policy, released=order[-1])
    assert sum(c.startswith("g") for c in order) == 8
    assert sum(c.startswith("s") for c in order) == 4


def test_releasing_a_chunk_twice_frees_one_place(client: Client) -> None:
    fair = _dispatcher(client, window=2)
    policy = client.settings.policy(Tier.OFFLINE)
    fair.enqueue(Tier.OFFLINE, "t", 1, [f"c{i}" for i in range(5)])
    assert fair.dispatch(Tier.OFFLINE, policy) == ["c0", "c1"]
    assert fair.dispatch(Tier.OFFLINE, policy, released="c0") == ["c2"]
    assert fair.dispatch(Tier.OFFLINE, policy, released="c0") == []  # a duplicate release
    assert fair.in_window(Tier.OFFLINE) == 2


@pytest.fixture
def one_slot(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(Services.open(settings.model_copy(update={"fair_window": 1})), worker="fair")
    yield rt
    rt.close()


def _serve_offline(runtime: Runtime, r: redis.Redis, limit: int) -> list[str]:
    """A one-slot worker in-process: take offline messages in kombu's order and run them."""
    ran = []
    key = queue_key(Tier.OFFLINE, runtime.settings.policy(Tier.OFFLINE).priority)
    for _ in range(limit):
        raw = r.rpop(key)
        if raw is None:
            break
        message = json.loads(raw)
        job_id = json.loads(base64.b64decode(message["body"]))[0][0]
        runtime.execute(job_id)
        ran.append(job_id)
    return ran


def test_a_small_tenant_is_not_starved_by_a_big_bulk_job(
    settings: Settings, one_slot: Runtime, redis_client: redis.Redis
) -> None:
    with Client.from_settings(settings.model_copy(update={"fair_window": 1})) as client:
        big = client.submit_bulk("upper", [f"b{i}" for i in range(100)], chunk_size=10,
                                 tenant="big")
        small = client.submit_bulk("upper", [f"s{i}" for i in range(20)], chunk_size=10,
                                   tenant="small")
        ran = _serve_offline(one_slot, redis_client, limit=100)
        big_chunks = {c.id for c in client.chunks(big.id)}
        owners = ["big" if job in big_chunks else "small" for job in ran]
        assert len(ran) == 12
        # The small tenant's two chunks ran in alternate turns right after it arrived (the big
        # job's first chunk was already on the queue), not after all ten big ones.
        small_turns = [i for i, owner in enumerate(owners) if owner == "small"]
        assert len(small_turns) == 2 and small_turns[1] - small_turns[0] == 2
        assert small_turns[1] <= 4
        assert small.status() == "succeeded" and big.status() == "succeeded"


def test_chunks_whose_publish_failed_give_their_window_places_back(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError

    import orchestrator.fairness as fairness
    from orchestrator.broker import TRANSPORT_KEY
    from orchestrator.errors import ServiceUnavailable

    publish, published = fairness.publish, []

    def blip(celery, job_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        if published:  # the broker fails after the first chunk went out
            raise OperationalError("simulated broker blip")
        published.append(job_id)
        return publish(celery, job_id, *args, **kwargs)

    monkeypatch.setattr(fairness, "publish", blip)
    with pytest.raises(ServiceUnavailable, match="cancelled"):
        client.submit_bulk("upper", [f"t{i}" for i in range(10)], tenant="t", chunk_size=2)
    monkeypatch.setattr(fairness, "publish", publish)
    # Only the chunk that went out keeps its place (its delivery frees it): the three others'
    # places were held for good, so every later bulk job of the tier waited in its list.
    window = {m.decode() for m in redis_client.smembers("orch:fair:offline:window")}
    assert window == set(published)
    later = client.submit_bulk("upper", ["u0", "u1", "u2", "u3"], tenant="t2", chunk_size=2)
    assert redis_client.llen("orch:fair:offline:q:t2") == 0
    assert window < {m.decode() for m in redis_client.smembers("orch:fair:offline:window")}
    assert all(redis_client.hexists(TRANSPORT_KEY, c.id) for c in client.chunks(later.id))
