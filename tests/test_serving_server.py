"""`esp serve` speaks TF Serving's API: requests built the TF Serving way, its status codes, batching, metrics."""

from __future__ import annotations

import socket
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.client import TFServingScorer, health_check
from serving.saved_model import SavedModelScorer
from tests.fixtures.models import TEST_LABELS

TEXTS = ["you are a moron", "what a lovely day", "I disagree with this edit", "🙂 unicode", "x"]


@pytest.fixture
def stub(model_server):
    with grpc.insecure_channel(model_server.target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


def _request(texts=TEXTS, **inputs):
    # As TF Serving's documentation builds one.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "bert"
    request.model_spec.signature_name = "serving_default"
    if inputs:
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    else:
        request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    return request


def test_tf_serving_style_request(stub, test_model_base):
    predict, _ = stub
    response = predict.Predict(_request(), timeout=10)
    assert response.model_spec.name == "bert" and response.model_spec.version.value == 1
    assert set(TEST_LABELS) <= set(response.outputs)
    local = SavedModelScorer(test_model_base).predict(TEXTS)
    for j, label in enumerate(local.labels):
        got = tf.make_ndarray(response.outputs[label])
        assert got.shape == (len(TEXTS),)
        np.testing.assert_allclose(got, [row[j] for row in local.probabilities], atol=1e-5)
    assert tf.make_ndarray(response.outputs["esp_truncated"]).dtype == np.bool_


def test_output_filter(stub):
    predict, _ = stub
    request = _request()
    request.output_filter.append("toxic")
    response = predict.Predict(request, timeout=10)
    assert list(response.outputs) == ["toxic"]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"comment": np.array([b"hi"], dtype=object)}, "input size does not match signature"),
        ({"text": np.array([1.0, 2.0], dtype=np.float32)}, "Expects arg"),
        ({"text": np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)}, "shape"),
        ({"text": np.array([b"a"], dtype=object), "extra": np.array([b"b"], dtype=object)}, "Sent extra"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_server_survives(stub, inputs, message):
    predict, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        predict.Predict(_request(**inputs), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert predict.Predict(_request(), timeout=10).model_spec.version.value == 1


def _declared(dtype, dims, **values):
    # Built by hand: shapes that declare more elements than the request carries (TF's compact form).
    proto = tf.make_tensor_proto(np.array([b"x"], dtype=object))
    proto.Clear()
    proto.dtype = dtype
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    for field, items in values.items():
        getattr(proto, field).extend(items)
    return proto


@pytest.mark.parametrize(
    "tensor, message",
    [
        # Twenty bytes that would make a 2**40-item list if the server filled the tensor out.
        (_declared(tf.string.as_datatype_enum, [2**40]), "declares 1099511627776 element(s) in its shape but carries 0"),
        (_declared(tf.string.as_datatype_enum, [2**31], string_val=[b"again"]), "but carries 1 value"),
        (_declared(tf.float32.as_datatype_enum, [2**20, 2**20], float_val=[0.5]), "but carries 1 value"),
        # Multiplied in int64 these wrap around to 0 elements.
        (_declared(tf.string.as_datatype_enum, [2**32, 2**32]), "declares 18446744073709551616"),
        (_declared(tf.string.as_datatype_enum, [3], string_val=[b"a", b"b"]), "declares 3 element(s) in its shape but carries 2"),
        (_declared(tf.string.as_datatype_enum, [-1], string_val=[b"a"]), "negative dimension"),
    ],
)
def test_a_shape_larger_than_its_values_is_refused_before_anything_is_allocated(stub, tensor, message):
    predict, _ = stub
    request = _request()
    request.inputs["text"].CopyFrom(tensor)
    with pytest.raises(grpc.RpcError) as info:
        predict.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert predict.Predict(_request(), timeout=10).model_spec.version.value == 1


def test_unknown_model_and_version_are_not_found(stub):
    predict, models = stub
    request = _request()
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as info:
        predict.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    request = _request()
    request.model_spec.version.value = 42
    with pytest.raises(grpc.RpcError) as info:
        predict.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as info:
        models.GetModelStatus(status_request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_empty_batch_answers_empty_outputs(stub):
    predict, _ = stub
    response = predict.Predict(_request(texts=np.array([], dtype=object)), timeout=10)
    assert tf.make_ndarray(response.outputs["toxic"]).shape == (0,)
    assert response.model_spec.version.value == 1


def test_metadata_and_status(stub):
    predict, models = stub
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "bert"
    response = predict.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    outputs = sig_map.signature_def["serving_default"].outputs
    assert {k for k in outputs if not k.startswith("esp_")} == set(TEST_LABELS)

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "bert"
    status = models.GetModelStatus(status_request, timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]

    with pytest.raises(grpc.RpcError) as info:
        predict.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(model_spec=request.model_spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health(model_server):
    assert health_check(model_server.target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def test_server_side_batching_merges_concurrent_clients(test_model_base, start_model_server):
    metrics_port = _free_port()
    server = start_model_server(
        test_model_base,
        extra_args=[
            "--enable-batching", "--max-execution-batch-size", "8", "--batch-timeout-micros", "20000",
            "--num-batch-threads", "1", "--metrics-port", str(metrics_port),
        ],
    )
    reference = SavedModelScorer(test_model_base).predict(TEXTS * 4)
    results: dict[int, object] = {}
    with TFServingScorer(server.target) as scorer:
        barrier = threading.Barrier(len(TEXTS) * 4)

        def one(i: int) -> None:
            barrier.wait(10)
            results[i] = scorer.predict([(TEXTS * 4)[i]])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(TEXTS) * 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        big = scorer.predict(TEXTS * 4)  # 20 rows > 8: split across batches, reassembled in order
    assert len(results) == 20
    for i, out in results.items():
        assert out.probabilities[0] == pytest.approx(reference.probabilities[i], abs=1e-5)
    for got, want in zip(big.probabilities, reference.probabilities):
        assert got == pytest.approx(want, abs=1e-5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    batches = _metric(text, "esp_serve_batch_rows_count")
    rows = _metric(text, "esp_serve_batch_rows_sum")
    assert rows == 40  # 20 single rows and 20 split rows (warmup runs before the batcher)
    assert batches < 20 + 3 + 1, "concurrent single-row requests were not merged"
    assert _metric(text, 'esp_serve_requests_total{code="OK",method="Predict"}') >= 21


def test_sigterm_stops_cleanly(test_model_base, start_model_server):
    server = start_model_server(test_model_base)
    assert server.stop(grace_s=20) == 0
