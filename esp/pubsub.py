"""Pub/Sub clients built from PubSubSettings, and Pub/Sub errors turned into one-line messages.

Every ESP component gets its clients here, so the emulator switch, timeouts and error wording are
the same everywhere. Importing this module is light; google-cloud-pubsub loads on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from esp.errors import EspError, ServiceUnreachable
from esp.localstack import port_open
from esp.settings import PubSubSettings

if TYPE_CHECKING:
    from google.cloud import pubsub_v1


def where(settings: PubSubSettings) -> str:
    if settings.emulator_host:
        return f"the Pub/Sub emulator at {settings.emulator_host} (PUBSUB_EMULATOR_HOST)"
    return f"Pub/Sub in project {settings.project}"


def check_reachable(settings: PubSubSettings) -> None:
    """Fails fast, with one line, when the emulator is configured but not listening.

    Without this a client retries for its whole deadline before saying anything. Real Pub/Sub is
    not probed: its errors arrive quickly and precisely through `translate_errors`.
    """
    if not settings.emulator_host:
        return
    host, _, port = settings.emulator_host.rpartition(":")
    if not port.isdigit() or not port_open(host or "127.0.0.1", int(port), timeout_s=2.0):
        raise ServiceUnreachable(f"cannot reach {where(settings)}: nothing is listening there")


# Pub/Sub takes messages of up to 10 MB (a publish request of up to 10,000,000 bytes). The client
# library's own production channels lift gRPC's 4 MiB receive default (send and receive unlimited);
# emulator channels get the same options, so local runs reach the same edges as production.
CHANNEL_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


def _emulator_channel(settings: PubSubSettings) -> Any:
    import grpc

    if not settings.emulator_host:
        raise EspError("no emulator host configured")
    return grpc.insecure_channel(settings.emulator_host, options=list(CHANNEL_OPTIONS))


@contextlib.contextmanager
def _credentials_hint() -> Iterator[None]:
    from google.auth.exceptions import DefaultCredentialsError

    try:
        yield
    except DefaultCredentialsError:
        raise EspError(
            "no Google Cloud credentials found: set PUBSUB_EMULATOR_HOST to use the emulator, or run "
            "'gcloud auth application-default login' (on GKE, use Workload Identity)"
        ) from None


def publisher_client(settings: PubSubSettings, **kwargs: Any) -> pubsub_v1.PublisherClient:
    """A PublisherClient; `kwargs` go to the client (batch_settings, publisher_options)."""
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

    if settings.emulator_host:
        kwargs["transport"] = PublisherGrpcTransport(channel=_emulator_channel(settings))
    with _credentials_hint():
        return pubsub_v1.PublisherClient(**kwargs)


def subscriber_client(settings: PubSubSettings) -> pubsub_v1.SubscriberClient:
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    with _credentials_hint():
        if settings.emulator_host:
            return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=_emulator_channel(settings)))
        return pubsub_v1.SubscriberClient()


@contextlib.contextmanager
def translate_errors(settings: PubSubSettings, doing: str) -> Iterator[None]:
    """Re-raises Pub/Sub client errors as EspError with what we were doing and where."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.PermissionDenied as exc:
        raise EspError(f"{doing}: permission denied on {where(settings)}: {exc.message}") from None
    except gexc.NotFound as exc:
        raise EspError(f"{doing}: not found on {where(settings)}: {exc.message} (run 'esp pubsub init')") from None
    except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError) as exc:
        raise ServiceUnreachable(f"{doing}: cannot reach {where(settings)}: {getattr(exc, 'message', exc)}") from None
    except gexc.GoogleAPICallError as exc:
        raise EspError(f"{doing}: {where(settings)} answered {exc.code}: {exc.message}") from None
