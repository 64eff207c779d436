"""A gRPC proxy in front of the Pub/Sub emulator that injects faults on demand, for tests and the
loss-ledger run (bench/loss_ledger.py).

Clients point PUBSUB_EMULATOR_HOST at the proxy; every unary call is forwarded byte for byte to
the real emulator, except those a rule catches, which fail with the rule's gRPC status, as Pub/Sub
itself would fail them (a topic unavailable, a request refused for its content, lease extensions
failing). The faults are real ones on the wire: the worker's own client code meets them exactly
as it would meet production's. Streaming methods are not proxied (ESP uses unary Pull).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

PUBLISH = "/google.pubsub.v1.Publisher/Publish"
PULL = "/google.pubsub.v1.Subscriber/Pull"
ACKNOWLEDGE = "/google.pubsub.v1.Subscriber/Acknowledge"
MODIFY_ACK_DEADLINE = "/google.pubsub.v1.Subscriber/ModifyAckDeadline"

# Pub/Sub carries 10 MB messages; the proxy must not be the narrower pipe.
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]


@dataclasses.dataclass
class Rule:
    """Fails calls of `method` for which `matches(request_bytes)` holds, with `code` and `details`."""

    method: str
    code: grpc.StatusCode
    details: str
    matches: Callable[[bytes], bool] = lambda request: True
    hits: int = 0


def publish_to(topic_path: str) -> Callable[[bytes], bool]:
    """Matches Publish requests to one topic."""

    def matches(request: bytes) -> bool:
        from google.pubsub_v1.types import PublishRequest

        return PublishRequest.pb().FromString(request).topic == topic_path

    return matches


def publish_containing(topic_path: str, marker: bytes) -> Callable[[bytes], bool]:
    """Matches Publish requests to one topic with a message whose data contains `marker`."""

    def matches(request: bytes) -> bool:
        from google.pubsub_v1.types import PublishRequest

        parsed = PublishRequest.pb().FromString(request)
        return parsed.topic == topic_path and any(marker in m.data for m in parsed.messages)

    return matches


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self._channel = grpc.insecure_channel(upstream, options=_CHANNEL_OPTIONS)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32), options=_CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers([_Forwarder(self)])
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.host = f"{host}:{self.port}"

    def start(self) -> FaultProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def count(self, method: str) -> int:
        with self._lock:
            return self.calls.get(method, 0)

    def _rule_for(self, method: str, request: bytes) -> Rule | None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            rules = [r for r in self._rules if r.method == method]
        for rule in rules:
            if rule.matches(request):
                with self._lock:
                    rule.hits += 1
                return rule
        return None

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        rule = self._rule_for(method, request)
        if rule is not None:
            context.abort(rule.code, rule.details)
        call = self._channel.unary_unary(method)
        try:
            return call(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
            raise  # unreachable: abort raises


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if "Streaming" in method:
            return None
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._proxy.forward(method, request, context))
