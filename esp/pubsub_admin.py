"""`esp pubsub init`: create, check and repair every Pub/Sub resource ESP needs, idempotently.

What ESP needs is declared once (`desired_subscriptions`), compared field by field with what
exists, and reported; `update=True` applies the differences that Pub/Sub lets one change in place.
On a real project it also grants Pub/Sub's service agent what dead-lettering requires.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from esp.pubsub import check_reachable, publisher_client, subscriber_client, translate_errors
from esp.settings import PubSubSettings

log = logging.getLogger(__name__)

DAY_S = 24 * 3600

# Roles Pub/Sub's service agent needs so the dead-letter policy can move messages
# (https://cloud.google.com/pubsub/docs/handling-failures#grant_forwarding_permissions).
PUBLISHER_ROLE = "roles/pubsub.publisher"
SUBSCRIBER_ROLE = "roles/pubsub.subscriber"


@dataclasses.dataclass
class Change:
    """One line of init's report: a resource and what happened or differs."""

    kind: str  # "topic" | "subscription" | "iam"
    name: str
    action: str  # "created" | "unchanged" | "differs" | "updated" | "granted" | "manual"
    detail: str = ""

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.action:<9} {self.kind:<12} {self.name}{detail}"


@dataclasses.dataclass
class InitReport:
    changes: list[Change] = dataclasses.field(default_factory=list)

    @property
    def differs(self) -> list[Change]:
        return [c for c in self.changes if c.action in ("differs", "manual")]

    @property
    def changed(self) -> bool:
        return any(c.action in ("created", "updated", "granted") for c in self.changes)


@dataclasses.dataclass(frozen=True)
class SubscriptionSpec:
    """The fields of a subscription ESP cares about, in comparable form."""

    name: str
    topic: str
    ack_deadline_seconds: int
    message_retention_s: int
    dead_letter_topic: str | None
    max_delivery_attempts: int | None
    min_backoff_s: int | None
    max_backoff_s: int | None

    def to_request(self) -> dict[str, Any]:
        req: dict[str, Any] = {
            "name": self.name,
            "topic": self.topic,
            "ack_deadline_seconds": self.ack_deadline_seconds,
            "message_retention_duration": {"seconds": self.message_retention_s},
            # An empty expiration policy means "never expire": a quiet week must not delete the
            # subscription (the default is 31 days of inactivity).
            "expiration_policy": {},
        }
        if self.dead_letter_topic:
            req["dead_letter_policy"] = {
                "dead_letter_topic": self.dead_letter_topic,
                "max_delivery_attempts": self.max_delivery_attempts,
            }
        if self.min_backoff_s is not None:
            req["retry_policy"] = {
                "minimum_backoff": {"seconds": self.min_backoff_s},
                "maximum_backoff": {"seconds": self.max_backoff_s},
            }
        return req


def desired_subscriptions(s: PubSubSettings) -> list[SubscriptionSpec]:
    return [
        SubscriptionSpec(
            name=s.subscription_path(s.subscription),
            topic=s.topic_path(s.comments_topic),
            ack_deadline_seconds=s.ack_deadline_s,
            message_retention_s=7 * DAY_S,
            dead_letter_topic=s.topic_path(s.dead_letter_topic),
            max_delivery_attempts=s.max_delivery_attempts,
            min_backoff_s=s.min_retry_backoff_s,
            max_backoff_s=s.max_retry_backoff_s,
        ),
        # Without a subscription, a message published to a topic is lost: this one holds dead
        # letters for `esp dead-letters`. No dead-letter policy of its own, so looking (pull, then
        # nack) costs nothing.
        SubscriptionSpec(
            name=s.subscription_path(s.dead_letter_subscription),
            topic=s.topic_path(s.dead_letter_topic),
            ack_deadline_seconds=60,
            message_retention_s=s.dead_letter_retention_days * DAY_S,
            dead_letter_topic=None,
            max_delivery_attempts=None,
            min_backoff_s=None,
            max_backoff_s=None,
        ),
        # Suggested scores from the HTTP API (comments:suggestscore): kept for the next training run.
        SubscriptionSpec(
            name=s.subscription_path(s.feedback_subscription),
            topic=s.topic_path(s.feedback_topic),
            ack_deadline_seconds=60,
            message_retention_s=7 * DAY_S,
            dead_letter_topic=None,
            max_delivery_attempts=None,
            min_backoff_s=None,
            max_backoff_s=None,
        ),
    ]


def _duration_s(d: Any) -> int:
    # proto-plus returns datetime.timedelta for Duration fields.
    return int(d.total_seconds()) if hasattr(d, "total_seconds") else int(getattr(d, "seconds", 0))


def existing_spec(sub: Any) -> SubscriptionSpec:
    has_dlp = bool(sub.dead_letter_policy.dead_letter_topic)
    has_retry = "retry_policy" in sub
    return SubscriptionSpec(
        name=sub.name,
        topic=sub.topic,
        ack_deadline_seconds=sub.ack_deadline_seconds,
        message_retention_s=_duration_s(sub.message_retention_duration),
        dead_letter_topic=sub.dead_letter_policy.dead_letter_topic if has_dlp else None,
        max_delivery_attempts=sub.dead_letter_policy.max_delivery_attempts if has_dlp else None,
        min_backoff_s=_duration_s(sub.retry_policy.minimum_backoff) if has_retry else None,
        max_backoff_s=_duration_s(sub.retry_policy.maximum_backoff) if has_retry else None,
    )


# Field of SubscriptionSpec -> the update mask path that changes it.
_UPDATABLE = {
    "ack_deadline_seconds": "ack_deadline_seconds",
    "message_retention_s": "message_retention_duration",
    "dead_letter_topic": "dead_letter_policy",
    "max_delivery_attempts": "dead_letter_policy",
    "min_backoff_s": "retry_policy",
    "max_backoff_s": "retry_policy",
}


def diff_specs(have: SubscriptionSpec, want: SubscriptionSpec) -> dict[str, tuple[Any, Any]]:
    return {
        f.name: (getattr(have, f.name), getattr(want, f.name))
        for f in dataclasses.fields(SubscriptionSpec)
        if getattr(have, f.name) != getattr(want, f.name)
    }


def _describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} is {have!r}, ESP needs {want!r}" for k, (have, want) in diff.items())


# ---------------------------------------------------------------------------------------------
# IAM for dead-lettering on a real project


@dataclasses.dataclass(frozen=True)
class Grant:
    resource: str  # topic or subscription path
    role: str
    member: str

    def gcloud_command(self) -> str:
        kind = "topics" if "/topics/" in self.resource else "subscriptions"
        short = self.resource.rsplit("/", 1)[1]
        project = self.resource.split("/")[1]
        return (
            f"gcloud pubsub {kind} add-iam-policy-binding {short} --project={project} "
            f"--member='{self.member}' --role='{self.role}'"
        )


def service_agent(project_number: str) -> str:
    return f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def dead_letter_grants(s: PubSubSettings, project_number: str) -> list[Grant]:
    """What Pub/Sub's service agent needs so the dead-letter policy can forward messages."""
    agent = service_agent(project_number)
    return [
        Grant(s.topic_path(s.dead_letter_topic), PUBLISHER_ROLE, agent),
        Grant(s.subscription_path(s.subscription), SUBSCRIBER_ROLE, agent),
    ]


def apply_grant(iam_api: Any, grant: Grant) -> bool:
    """Adds `grant` to the resource's policy unless present; returns whether it changed anything.

    `iam_api` is a Pub/Sub publisher (topics) or subscriber (subscriptions) client: both expose
    get_iam_policy/set_iam_policy. Read-modify-write keeps the policy's etag, so a concurrent edit
    makes set_iam_policy fail instead of silently overwriting it.
    """
    policy = iam_api.get_iam_policy(request={"resource": grant.resource})
    for binding in policy.bindings:
        if binding.role == grant.role and grant.member in binding.members:
            return False
    for binding in policy.bindings:
        if binding.role == grant.role:
            binding.members.append(grant.member)
            break
    else:
        policy.bindings.add(role=grant.role, members=[grant.member])
    iam_api.set_iam_policy(request={"resource": grant.resource, "policy": policy})
    return True


def lookup_project_number(project: str) -> str | None:
    """The project's number via Resource Manager, or None when that API is not available to us."""
    try:
        from google.cloud import resourcemanager_v3  # installed with the beam extra, optional
    except ImportError:
        return None
    try:
        project_obj = resourcemanager_v3.ProjectsClient().get_project(name=f"projects/{project}")
    except Exception as exc:  # any failure here only means "print the commands instead"
        log.info("could not look up the number of project %s: %s", project, exc)
        return None
    return project_obj.name.split("/")[1]


# ---------------------------------------------------------------------------------------------


def init_resources(
    settings: PubSubSettings,
    *,
    update: bool = False,
    project_number: str | None = None,
    grant_iam: bool = True,
    number_lookup: Callable[[str], str | None] = lookup_project_number,
) -> InitReport:
    """Creates what is missing, reports what differs, and with `update` fixes what can be fixed."""
    from google.api_core import exceptions as gexc

    check_reachable(settings)
    report = InitReport()
    publisher = publisher_client(settings)
    subscriber = subscriber_client(settings)
    timeout = settings.pubsub_timeout_s
    try:
        for topic in (settings.comments_topic, settings.scores_topic, settings.dead_letter_topic, settings.feedback_topic):
            path = settings.topic_path(topic)
            with translate_errors(settings, f"creating topic {topic}"):
                try:
                    publisher.create_topic(request={"name": path}, timeout=timeout)
                    report.changes.append(Change("topic", path, "created"))
                except gexc.AlreadyExists:
                    report.changes.append(Change("topic", path, "unchanged"))

        for want in desired_subscriptions(settings):
            with translate_errors(settings, f"creating subscription {want.name}"):
                try:
                    subscriber.create_subscription(request=want.to_request(), timeout=timeout)
                    report.changes.append(Change("subscription", want.name, "created"))
                    continue
                except gexc.AlreadyExists:
                    pass
                have = existing_spec(subscriber.get_subscription(request={"subscription": want.name}, timeout=timeout))
                diff = diff_specs(have, want)
                if not diff:
                    report.changes.append(Change("subscription", want.name, "unchanged"))
                elif "topic" in diff:
                    # Pub/Sub cannot move a subscription to another topic.
                    report.changes.append(
                        Change("subscription", want.name, "manual", _describe_diff(diff) + "; delete and re-run init")
                    )
                elif update:
                    paths = sorted({_UPDATABLE[k] for k in diff})
                    subscriber.update_subscription(
                        request={"subscription": want.to_request(), "update_mask": {"paths": paths}}, timeout=timeout
                    )
                    report.changes.append(Change("subscription", want.name, "updated", _describe_diff(diff)))
                else:
                    report.changes.append(
                        Change("subscription", want.name, "differs", _describe_diff(diff) + " (--update fixes it)")
                    )

        # The emulator has no IAM; on a real project the policy cannot forward without these grants.
        if grant_iam and not settings.emulator_host:
            number = project_number or number_lookup(settings.project)
            report.changes.extend(_grant_dead_letter_access(settings, number, publisher, subscriber))
    finally:
        subscriber.close()
        publisher.transport.close()
    return report


def _grant_dead_letter_access(
    settings: PubSubSettings, number: str | None, publisher: Any, subscriber: Any
) -> list[Change]:
    from google.api_core import exceptions as gexc

    if number is None:
        grants = dead_letter_grants(settings, "PROJECT_NUMBER")
        hint = "project number unknown (pass --project-number); run, with PROJECT_NUMBER filled in: "
        return [Change("iam", g.resource, "manual", hint + g.gcloud_command()) for g in grants]
    changes = []
    for grant in dead_letter_grants(settings, number):
        api = publisher if "/topics/" in grant.resource else subscriber
        try:
            changed = apply_grant(api, grant)
        except gexc.PermissionDenied:
            changes.append(Change("iam", grant.resource, "manual", "not allowed to grant; run: " + grant.gcloud_command()))
            continue
        changes.append(Change("iam", grant.resource, "granted" if changed else "unchanged", f"{grant.role} to {grant.member}"))
    return changes
