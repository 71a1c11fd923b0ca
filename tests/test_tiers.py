"""Tier order on the wire: kombu's Redis transport serves priority steps before queue order."""

from __future__ import annotations

import json

import pytest
import redis
from kombu import Connection

from orchestrator.broker import make_celery, publish, queue_key
from orchestrator.settings import Settings
from orchestrator.tiers import DEFAULT_POLICIES, PRIORITY_STEPS, TIER_ORDER, Tier, parse_tiers


def test_tier_priorities_are_kombu_steps_that_agree_with_queue_order() -> None:
    priorities = [DEFAULT_POLICIES[tier].priority for tier in TIER_ORDER]
    assert priorities == sorted(priorities)
    assert len(set(priorities)) == 3
    assert all(p in PRIORITY_STEPS for p in priorities)


def test_parse_tiers_keeps_order_and_rejects_unknown_or_repeated_names() -> None:
    assert parse_tiers("offline, interactive") == [Tier.OFFLINE, Tier.INTERACTIVE]
    with pytest.raises(ValueError, match="unknown tier 'batch'"):
        parse_tiers("interactive,batch")
    with pytest.raises(ValueError, match="given twice"):
        parse_tiers("offline,offline")


def _message_keys(client: redis.Redis) -> dict[str, int]:
    return {
        key.decode(): client.llen(key)
        for key in client.keys("*")
        if client.type(key) == b"list"
    }


def test_publish_puts_each_tier_on_its_own_priority_step(
    settings: Settings, redis_client: redis.Redis
) -> None:
    app = make_celery(settings)
    for tier in TIER_ORDER:
        publish(app, f"job-{tier.value}", tier, settings.policy(tier).priority)
    keys = _message_keys(redis_client)
    assert keys == {queue_key(tier, settings.policy(tier).priority): 1 for tier in TIER_ORDER}
    raw = redis_client.lrange(queue_key(Tier.OFFLINE, 6), 0, -1)[0]
    message = json.loads(raw)
    assert message["properties"]["priority"] == 6
    assert message["content-type"] == "application/json"
    app.close()


def test_kombu_serves_better_priority_step_before_queue_order(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Why every message carries its tier's priority: without one, an offline message lands in
    step 0 and is served before a nearline message at step 3, whatever the queue order."""
    app = make_celery(settings)
    with Connection(settings.resolved_broker_url(),
                    transport_options=app.conf.broker_transport_options) as conn:
        channel = conn.default_channel
        for tier in TIER_ORDER:
            channel.queue_declare(tier.value)
        for tier in TIER_ORDER:
            channel.basic_consume(tier.value, False, lambda m: None, f"test-{tier.value}")
        # kombu's BRPOP key list: every queue at step 0, then every queue at step 3, ...
        keys = [channel._q_for_pri(q, pri) for pri in channel.priority_steps
                for q in channel._queue_cycle.consume(len(channel.active_queues))]
        assert keys[:3] == ["interactive", "nearline", "offline"]
        assert keys[3:6] == [queue_key(t, 1) for t in TIER_ORDER]

        # An unprioritised offline message outranks a nearline one at step 3 ...
        producer = conn.Producer(serializer="json")
        producer.publish({"n": "nearline"}, exchange="", routing_key="nearline", priority=3)
        producer.publish({"n": "offline-unprioritised"}, exchange="", routing_key="offline")
        assert redis_client.llen("offline") == 1  # step 0: the best one
        # ... because kombu BRPOPs the keys in that order and takes the first non-empty list.
        first_key, body = redis_client.brpop(keys, timeout=1)
        assert first_key.decode() == "offline"
        assert json.loads(body)["body"]
    app.close()


def test_visibility_timeout_must_outlast_every_tier_time_limit(tmp_path) -> None:
    from orchestrator.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="visibility_timeout_s"):
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path), "ORCH_VISIBILITY_TIMEOUT_S": "60"})
