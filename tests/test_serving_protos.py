"""ESP's own TF Serving messages (serving.esp_tfs_pb2) are byte-compatible with tensorflow-serving-api's.

Both sets live in one process here, which also proves they do not collide in the descriptor pool.
"""

from __future__ import annotations

import os

import hypothesis
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import any_pb2
from hypothesis import strategies as st
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from serving import esp_tfs_pb2 as ours
from serving.client import ModelContractError, string_tensor, tensor_values
from serving.saved_model import LoadedModel
from serving.saved_model_files import resolve_version_dir

# Examples per property test; ESP_HYPOTHESIS_EXAMPLES=5000 for a longer run.
EXAMPLES = int(os.environ.get("ESP_HYPOTHESIS_EXAMPLES", "150"))


def _same_bytes(theirs_msg, ours_cls, theirs_cls):
    """theirs -> bytes -> ours -> bytes is identical, and ours -> bytes -> theirs is equal."""
    wire = theirs_msg.SerializeToString(deterministic=True)
    mine = ours_cls.FromString(wire)
    assert mine.SerializeToString(deterministic=True) == wire
    back = theirs_cls.FromString(mine.SerializeToString(deterministic=True))
    assert back == theirs_msg
    return mine


def test_predict_request_built_by_tf_parses_as_ours():
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "bert"
    req.model_spec.signature_name = "serving_default"
    req.model_spec.version.value = 7
    req.inputs["text"].CopyFrom(tf.make_tensor_proto(["héllo", "wörld", ""], dtype=tf.string))
    req.output_filter.append("toxic")
    mine = _same_bytes(req, ours.PredictRequest, predict_pb2.PredictRequest)
    assert mine.model_spec.version.value == 7
    assert tensor_values(mine.inputs["text"]) == ["héllo".encode(), "wörld".encode(), b""]


def test_our_predict_request_parses_as_theirs():
    mine = ours.PredictRequest()
    mine.model_spec.name = "bert"
    mine.model_spec.version_label = "stable"
    mine.inputs["text"].CopyFrom(string_tensor(["a", "b 🙂"]))
    theirs = predict_pb2.PredictRequest.FromString(mine.SerializeToString())
    assert theirs.model_spec.WhichOneof("version_choice") == "version_label"
    assert theirs.model_spec.version_label == "stable"
    assert list(tf.make_ndarray(theirs.inputs["text"])) == [b"a", "b 🙂".encode()]
    assert theirs.SerializeToString(deterministic=True) == mine.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    "array",
    [
        np.array([0.25, 0.5, 1e-7], dtype=np.float32),
        np.array([True, False, True]),
        np.array([[1, 2], [3, 4]], dtype=np.int64),
        np.array([1.5, -2.25], dtype=np.float64),
        np.array([7, -8], dtype=np.int32),
    ],
)
def test_tensors_both_encodings(array):
    # tf.make_tensor_proto uses tensor_content; TF Serving's responses use the typed *_val fields.
    packed = tf.make_tensor_proto(array)
    mine = _same_bytes(packed, ours.TensorProto, type(packed))
    assert tensor_values(mine) == array.reshape(-1).tolist()
    typed = type(packed)(dtype=packed.dtype, tensor_shape=packed.tensor_shape)
    field = {np.float32: "float_val", np.bool_: "bool_val", np.int64: "int64_val", np.float64: "double_val", np.int32: "int_val"}[array.dtype.type]
    getattr(typed, field).extend(array.reshape(-1).tolist())
    mine = _same_bytes(typed, ours.TensorProto, type(packed))
    assert tensor_values(mine) == array.reshape(-1).tolist()


def test_predict_response_with_version():
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = "bert"
    resp.model_spec.version.value = 3
    resp.model_spec.signature_name = "serving_default"
    resp.outputs["toxic"].CopyFrom(tf.make_tensor_proto(np.array([0.1, 0.9], dtype=np.float32)))
    resp.outputs["esp_truncated"].CopyFrom(tf.make_tensor_proto(np.array([False, True])))
    mine = _same_bytes(resp, ours.PredictResponse, predict_pb2.PredictResponse)
    assert mine.model_spec.version.value == 3
    assert tensor_values(mine.outputs["esp_truncated"]) == [False, True]


def test_metadata_response_with_a_real_signature_def(test_model_base):
    path, version = resolve_version_dir(test_model_base)
    model = LoadedModel(path, version)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, value in model.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(value)
    packed = any_pb2.Any()
    packed.Pack(sig_map)
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = "bert"
    resp.model_spec.version.value = version
    resp.metadata["signature_def"].CopyFrom(packed)
    mine = _same_bytes(resp, ours.GetModelMetadataResponse, get_model_metadata_pb2.GetModelMetadataResponse)
    our_map = ours.SignatureDefMap.FromString(mine.metadata["signature_def"].value)
    assert our_map.SerializeToString(deterministic=True) == sig_map.SerializeToString(deterministic=True)
    sig = our_map.signature_def["serving_default"]
    assert list(sig.inputs) == ["text"] and sig.inputs["text"].dtype == ours.DT_STRING
    assert "esp_truncated" in sig.outputs and sig.outputs["toxic"].dtype == ours.DT_FLOAT

    req = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="bert"), metadata_field=["signature_def"])
    _same_bytes(req, ours.GetModelMetadataRequest, get_model_metadata_pb2.GetModelMetadataRequest)


def test_model_status_messages():
    resp = get_model_status_pb2.GetModelStatusResponse()
    entry = resp.model_version_status.add(version=2, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    entry.status.error_code = 0
    resp.model_version_status.add(version=1, state=get_model_status_pb2.ModelVersionStatus.END).status.error_message = "unloaded"
    mine = _same_bytes(resp, ours.GetModelStatusResponse, get_model_status_pb2.GetModelStatusResponse)
    assert [(s.version, s.state) for s in mine.model_version_status] == [(2, ours.ModelVersionStatus.AVAILABLE), (1, ours.ModelVersionStatus.END)]
    req = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="bert"))
    req.model_spec.version.value = 2
    _same_bytes(req, ours.GetModelStatusRequest, get_model_status_pb2.GetModelStatusRequest)


def test_packages_do_not_collide():
    assert ours.TensorProto.DESCRIPTOR.full_name == "esp_tfs.TensorProto"
    assert predict_pb2.PredictRequest.DESCRIPTOR.full_name == "tensorflow.serving.PredictRequest"


def test_a_response_tensor_declaring_more_than_expected_is_refused_before_it_is_filled():
    # One value and a shape of 2**40: filled out, a worker would run out of memory.
    compact = ours.TensorProto(dtype=ours.DT_FLOAT, float_val=[0.5])
    compact.tensor_shape.dim.add(size=2**40)
    with pytest.raises(ModelContractError, match="declares more than the 3 element"):
        tensor_values(compact, max_elements=3)
    compact.tensor_shape.dim[0].size = 3
    assert tensor_values(compact, max_elements=3) == [0.5, 0.5, 0.5]


def test_our_saved_model_message_reads_the_signatures_tensorflow_reads(test_model_base):
    """The pre-flights read saved_model.pb with ESP's cut-down SavedModel message, so as not to import
    TensorFlow: every stored signature must come out as TensorFlow's full message reads it."""
    from tensorflow.core.protobuf import saved_model_pb2

    from serving.saved_model_files import stored_labels, stored_signature_defs

    path, version = resolve_version_dir(test_model_base)
    theirs = stored_signature_defs(path, saved_model_pb2.SavedModel)
    mine = stored_signature_defs(path)
    assert sorted(mine) == sorted(theirs) and "serving_default" in mine
    for name, signature in theirs.items():
        assert mine[name] == ours.SignatureDef.FromString(signature.SerializeToString(deterministic=True)), name
    assert stored_labels(test_model_base) == tuple(LoadedModel(path, version).labels())


def test_a_graph_without_the_serve_tag_falls_back_to_the_first_and_no_graph_is_refused(tmp_path):
    from serving.saved_model_files import stored_signature_defs

    stored = ours.SavedModel(saved_model_schema_version=1)
    graph = stored.meta_graphs.add()
    graph.meta_info_def.tags.append("train")
    graph.signature_def["only"].method_name = "tensorflow/serving/predict"
    (tmp_path / "saved_model.pb").write_bytes(stored.SerializeToString())
    assert list(stored_signature_defs(tmp_path)) == ["only"]
    (tmp_path / "saved_model.pb").write_bytes(ours.SavedModel(saved_model_schema_version=1).SerializeToString())
    with pytest.raises(ModelContractError, match="holds no graph"):
        stored_signature_defs(tmp_path)


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_any_bytes_as_saved_model_pb_give_labels_or_one_contract_error(tmp_path, test_model_base, data):
    """The pre-flight's reader on hostile files: arbitrary bytes, and the real saved_model.pb cut short or
    with bytes overwritten (deep nesting, bad UTF-8 in tags and map keys, lengths past the end)."""
    from esp.scoring import ModelNotFound
    from serving.saved_model_files import stored_labels

    real = (resolve_version_dir(test_model_base)[0] / "saved_model.pb").read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "cut", "overwritten"]))
    if kind == "bytes":
        body = data.draw(st.binary(max_size=4096))
    elif kind == "cut":
        body = real[: data.draw(st.integers(0, len(real)))]
    else:
        at = data.draw(st.integers(0, len(real) - 1))
        body = real[:at] + data.draw(st.binary(min_size=1, max_size=64)) + real[at + 64:]
    version = tmp_path / "1"
    version.mkdir(exist_ok=True)
    (version / "saved_model.pb").write_bytes(body)
    try:
        labels = stored_labels(tmp_path)
    except (ModelContractError, ModelNotFound) as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert all(isinstance(label, str) for label in labels)
