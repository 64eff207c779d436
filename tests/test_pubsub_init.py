"""`esp pubsub init` against the real emulator, and the IAM requests it makes on a real project."""

from __future__ import annotations

import dataclasses

from esp.pubsub import publisher_client, subscriber_client
from esp.pubsub_admin import (
    PUBLISHER_ROLE,
    SUBSCRIBER_ROLE,
    apply_grant,
    dead_letter_grants,
    init_resources,
    service_agent,
)
from esp.settings import PubSubSettings
from tests.fixtures.pubsub import unique_settings


def _read_subscription(settings: PubSubSettings, name: str):
    client = subscriber_client(settings)
    try:
        return client.get_subscription(request={"subscription": settings.subscription_path(name)})
    finally:
        client.close()


def test_init_creates_everything_then_changes_nothing(pubsub_settings: PubSubSettings) -> None:
    first = init_resources(pubsub_settings)
    assert [c.action for c in first.changes] == ["created"] * 7  # 4 topics, 3 subscriptions
    assert first.changed

    # Read back through the admin API: the policy really is on the subscription.
    sub = _read_subscription(pubsub_settings, pubsub_settings.subscription)
    assert sub.topic == pubsub_settings.topic_path(pubsub_settings.comments_topic)
    assert sub.dead_letter_policy.dead_letter_topic == pubsub_settings.topic_path(pubsub_settings.dead_letter_topic)
    assert sub.dead_letter_policy.max_delivery_attempts == 5
    assert sub.ack_deadline_seconds == pubsub_settings.ack_deadline_s
    assert sub.retry_policy.maximum_backoff.total_seconds() == pubsub_settings.max_retry_backoff_s

    hold = _read_subscription(pubsub_settings, pubsub_settings.dead_letter_subscription)
    assert hold.topic == pubsub_settings.topic_path(pubsub_settings.dead_letter_topic)
    assert hold.message_retention_duration.total_seconds() == 7 * 24 * 3600
    assert not hold.dead_letter_policy.dead_letter_topic

    publisher = publisher_client(pubsub_settings)
    topics = {t.name for t in publisher.list_topics(request={"project": f"projects/{pubsub_settings.project}"})}
    assert {
        pubsub_settings.topic_path(pubsub_settings.comments_topic),
        pubsub_settings.topic_path(pubsub_settings.scores_topic),
        pubsub_settings.topic_path(pubsub_settings.dead_letter_topic),
    } <= topics

    second = init_resources(pubsub_settings)
    assert [c.action for c in second.changes] == ["unchanged"] * 7
    assert not second.changed and not second.differs


def test_difference_is_reported_and_update_fixes_it(pubsub_settings: PubSubSettings) -> None:
    # A subscription someone created by hand, without the dead-letter policy.
    publisher = publisher_client(pubsub_settings)
    publisher.create_topic(request={"name": pubsub_settings.topic_path(pubsub_settings.comments_topic)})
    subscriber = subscriber_client(pubsub_settings)
    subscriber.create_subscription(
        request={
            "name": pubsub_settings.subscription_path(pubsub_settings.subscription),
            "topic": pubsub_settings.topic_path(pubsub_settings.comments_topic),
        }
    )
    report = init_resources(pubsub_settings)
    differs = report.differs
    assert len(differs) == 1 and differs[0].name.endswith(pubsub_settings.subscription)
    assert "dead_letter_topic is None" in differs[0].detail
    assert not _read_subscription(pubsub_settings, pubsub_settings.subscription).dead_letter_policy.dead_letter_topic

    fixed = init_resources(pubsub_settings, update=True)
    assert [c.action for c in fixed.changes if c.kind == "subscription"] == ["updated", "unchanged", "unchanged"]
    sub = _read_subscription(pubsub_settings, pubsub_settings.subscription)
    assert sub.dead_letter_policy.max_delivery_attempts == pubsub_settings.max_delivery_attempts
    assert not init_resources(pubsub_settings).differs


def test_changed_setting_is_a_difference(pubsub_settings: PubSubSettings) -> None:
    init_resources(pubsub_settings)
    seven = dataclasses.replace(pubsub_settings, max_delivery_attempts=7)
    report = init_resources(seven)
    assert [c.detail for c in report.differs] == [
        "max_delivery_attempts is 5, ESP needs 7 (--update fixes it)"
    ]
    init_resources(seven, update=True)
    assert _read_subscription(seven, seven.subscription).dead_letter_policy.max_delivery_attempts == 7


# --- IAM: the emulator ignores permissions, so the requests are checked against a tiny fake ----


class _Binding:
    def __init__(self, role: str, members: list[str]) -> None:
        self.role = role
        self.members = list(members)


class _Bindings(list):
    def add(self, role: str, members: list[str]) -> _Binding:
        binding = _Binding(role, members)
        self.append(binding)
        return binding


class _Policy:
    def __init__(self) -> None:
        self.bindings = _Bindings()
        self.etag = b"v1"


class RecordingIamApi:
    """Holds one policy per resource, like Pub/Sub's IAM methods, and records each request."""

    def __init__(self) -> None:
        self.policies: dict[str, _Policy] = {}
        self.requests: list[tuple[str, str]] = []

    def get_iam_policy(self, request: dict) -> _Policy:
        self.requests.append(("get", request["resource"]))
        return self.policies.setdefault(request["resource"], _Policy())

    def set_iam_policy(self, request: dict) -> _Policy:
        self.requests.append(("set", request["resource"]))
        self.policies[request["resource"]] = request["policy"]
        return request["policy"]


def test_dead_letter_grants_name_the_service_agent_and_resources() -> None:
    s = PubSubSettings(project="acme-prod")
    grants = dead_letter_grants(s, "123456")
    agent = "serviceAccount:service-123456@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert service_agent("123456") == agent
    assert [(g.resource, g.role, g.member) for g in grants] == [
        ("projects/acme-prod/topics/comments-dead-letter", PUBLISHER_ROLE, agent),
        ("projects/acme-prod/subscriptions/comments-scoring", SUBSCRIBER_ROLE, agent),
    ]
    assert grants[0].gcloud_command() == (
        "gcloud pubsub topics add-iam-policy-binding comments-dead-letter --project=acme-prod "
        f"--member='{agent}' --role='roles/pubsub.publisher'"
    )


def test_apply_grant_adds_the_binding_once() -> None:
    api = RecordingIamApi()
    grant = dead_letter_grants(PubSubSettings(project="acme"), "42")[0]
    assert apply_grant(api, grant) is True
    assert api.requests == [("get", grant.resource), ("set", grant.resource)]
    policy = api.policies[grant.resource]
    assert [(b.role, b.members) for b in policy.bindings] == [(grant.role, [grant.member])]
    # Second run: the binding is there, so nothing is written.
    assert apply_grant(api, grant) is False
    assert api.requests[-1] == ("get", grant.resource)
    assert len(api.requests) == 3


def test_apply_grant_keeps_other_members_of_the_role() -> None:
    api = RecordingIamApi()
    grant = dead_letter_grants(PubSubSettings(project="acme"), "42")[0]
    existing = api.get_iam_policy({"resource": grant.resource})
    existing.bindings.add(role=grant.role, members=["user:ops@example.com"])
    apply_grant(api, grant)
    assert api.policies[grant.resource].bindings[0].members == ["user:ops@example.com", grant.member]


def test_init_on_emulator_makes_no_iam_requests(emulator) -> None:
    s = unique_settings(emulator)
    report = init_resources(s, project_number="42")
    assert not [c for c in report.changes if c.kind == "iam"]
