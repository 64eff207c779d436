"""TF Serving's MonitoringConfig and SSLConfig messages, which tensorflow-serving-api does not ship.

`esp serve` reads the same --monitoring_config_file and --ssl_config_file text files as TF Serving,
so they are parsed with these messages, declared here with the names and field numbers of
tensorflow_serving/config/monitoring_config.proto and ssl_config.proto (a field TF Serving does not
know is then a parse error here too). They live in their own descriptor pool, so they cannot clash
with a tensorflow-serving-api that one day ships them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "tensorflow.serving"
_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE

# message name -> [(field name, number, type, message type name)]
_MESSAGES: dict[str, list[tuple[str, int, int, str | None]]] = {
    "PrometheusConfig": [("enable", 1, _BOOL, None), ("path", 2, _STRING, None)],
    "MonitoringConfig": [("prometheus_config", 1, _MESSAGE, "PrometheusConfig")],
    "SSLConfig": [
        ("server_key", 1, _STRING, None),
        ("server_cert", 2, _STRING, None),
        ("custom_ca", 3, _STRING, None),
        ("client_verify", 4, _BOOL, None),
    ],
}


@cache
def _classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="esp_tf_serving_configs.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, type_, type_name in fields:
            field = message.field.add(
                name=field_name, number=number, type=type_, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES}


def monitoring_config() -> Any:
    """An empty tensorflow.serving.MonitoringConfig."""
    return _classes()["MonitoringConfig"]()


def ssl_config() -> Any:
    """An empty tensorflow.serving.SSLConfig."""
    return _classes()["SSLConfig"]()
