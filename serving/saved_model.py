"""In-process SavedModel: ESP's `Scorer` without a model server, and the loader `esp serve` uses.

`SavedModelScorer` loads one version of a contract-conforming SavedModel into this process with
the real TF runtime (the Beam backfill's in-process handler, `esp score --saved-model`, tests).
`LoadedModel` is one loaded version with its signature_defs exactly as stored in
saved_model.pb, which is what TF Serving's GetModelMetadata returns. Importing this module loads
TensorFlow; the gRPC client (`serving.client`) never does, nor do the pre-flights, which read a
model's versions and labels with `serving.saved_model_files`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops the model's graph uses)
from tensorflow.core.protobuf import saved_model_pb2

from esp.contracts import labels_from_outputs
from esp.scoring import ModelContractError, ModelNotFound, ModelOutput, ModelRejected
from serving.saved_model_files import DEFAULT_SIGNATURE, SERVE_TAG, resolve_version_dir, stored_signature_defs

log = logging.getLogger(__name__)

INPUT_KEY = "text"
THRESHOLD_PREFIX = "esp_threshold_"
TRUNCATED_KEY = "esp_truncated"
DEFAULT_THRESHOLD = 0.5


class SignatureError(ValueError):
    """A request does not fit the signature (key, dtype, shape): TF Serving's INVALID_ARGUMENT."""


class LoadedModel:
    """One loaded SavedModel version: run a signature on numpy inputs, read its signature_defs."""

    def __init__(self, path: str | os.PathLike, version: int) -> None:
        self.path = Path(path)
        self.version = version
        self.signature_defs = stored_signature_defs(self.path, saved_model_pb2.SavedModel)
        self._loaded = tf.saved_model.load(str(self.path), tags=[SERVE_TAG])
        self._functions = dict(self._loaded.signatures)
        self._input_specs: dict[str, dict[str, tf.TensorSpec]] = {}
        for name, fn in self._functions.items():
            _, kwargs = fn.structured_input_signature
            self._input_specs[name] = dict(kwargs)

    @property
    def signature_names(self) -> list[str]:
        return sorted(self._functions)

    def output_keys(self, signature_name: str = DEFAULT_SIGNATURE) -> list[str]:
        return sorted(self.signature_defs[signature_name].outputs)

    def labels(self, signature_name: str = DEFAULT_SIGNATURE) -> list[str]:
        return labels_from_outputs(self.output_keys(signature_name))

    def check_inputs(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> None:
        """Raises SignatureError when `inputs` do not fit the signature, in TF Serving's words."""
        if signature_name not in self._functions:
            raise SignatureError(f'Serving signature key "{signature_name}" not found.')
        specs = self._input_specs[signature_name]
        if set(inputs) != set(specs):
            extra = sorted(set(inputs) - set(specs))
            missing = sorted(set(specs) - set(inputs))
            raise SignatureError(
                f"input size does not match signature: {len(inputs)}!={len(specs)} "
                f"len({sorted(inputs)}) != len({sorted(specs)}). Sent extra: {extra}. Missing but required: {missing}."
            )
        for key, spec in specs.items():
            value = inputs[key]
            got = tf.string if value.dtype.kind in "OSU" else tf.as_dtype(value.dtype)
            if got != spec.dtype:
                raise SignatureError(f"Expects arg[{key!r}] to be {spec.dtype.name} but {got.name} is provided")
            if not spec.shape.is_compatible_with(value.shape):
                raise SignatureError(
                    f"input {key!r} has shape {list(value.shape)}, the signature expects {spec.shape.as_list()}"
                )

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs a signature. Raises SignatureError or tf.errors.OpError (e.g. InvalidArgumentError)."""
        self.check_inputs(signature_name, inputs)
        fn = self._functions[signature_name]
        tensors = {k: tf.constant(v, dtype=self._input_specs[signature_name][k].dtype) for k, v in inputs.items()}
        result = fn(**tensors)
        return {k: v.numpy() for k, v in result.items()}


def output_from_arrays(
    model_name: str, version: int, outputs: Mapping[str, np.ndarray], n: int
) -> ModelOutput:
    """The model contract applied to a signature's outputs (shared with tests and the server)."""
    labels = tuple(labels_from_outputs(list(outputs)))
    if not labels:
        raise ModelContractError(f"model {model_name} v{version} declares no label outputs")
    columns = []
    for label in labels:
        col = np.asarray(outputs[label]).reshape(-1)
        if col.shape[0] != n:
            raise ModelContractError(f"model {model_name} v{version}: output {label!r} has {col.shape[0]} rows for {n} texts")
        columns.append(col.astype(np.float64))
    thresholds = {}
    for label in labels:
        values = np.asarray(outputs.get(THRESHOLD_PREFIX + label, np.zeros([0]))).reshape(-1)
        thresholds[label] = float(values[0]) if values.size else DEFAULT_THRESHOLD
    if TRUNCATED_KEY in outputs:
        truncated = [bool(v) for v in np.asarray(outputs[TRUNCATED_KEY]).reshape(-1)]
    else:
        truncated = [False] * n
    probabilities = [tuple(float(x) for x in row) for row in np.stack(columns, axis=1)] if n else []
    return ModelOutput(
        model_name=model_name,
        model_version=version,
        labels=labels,
        probabilities=probabilities,
        thresholds=thresholds,
        truncated=truncated,
    )


class SavedModelScorer:
    """Scores texts with a SavedModel loaded into this process; implements esp.scoring.Scorer.

    `path` is a TF Serving base path (the latest version, or `version`, is loaded) or a version
    directory. The model version reported is the directory's integer name.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        version: int | None = None,
        model_name: str = "bert",
        signature_name: str = DEFAULT_SIGNATURE,
    ) -> None:
        directory, resolved = resolve_version_dir(path, version)
        self.model_name = model_name
        self.signature_name = signature_name
        self.model = LoadedModel(directory, resolved)
        if signature_name not in self.model.signature_names:
            raise ModelNotFound(f"SavedModel {directory} has no signature {signature_name!r}")
        self._lock = threading.Lock()
        log.info("loaded model %s version %d from %s", model_name, resolved, directory)

    @property
    def model_version(self) -> int:
        return self.model.version

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.model.labels(self.signature_name))

    def check_ready(self) -> int:
        return self.model.version

    def predict(self, texts: Sequence[str]) -> ModelOutput:
        inputs = {INPUT_KEY: np.array([t.encode("utf-8") for t in texts], dtype=object).reshape([len(texts)])}
        try:
            outputs = self.model.run(self.signature_name, inputs)
        except SignatureError as exc:
            raise ModelRejected(f"model {self.model_name} v{self.model.version} (in-process): {exc}") from None
        except tf.errors.InvalidArgumentError as exc:
            raise ModelRejected(f"model {self.model_name} v{self.model.version} (in-process): {exc.message}") from None
        return output_from_arrays(self.model_name, self.model.version, outputs, len(texts))

    def close(self) -> None:
        # Dropping the reference lets TF free the graph; there is no handle to close.
        pass


def numpy_input(texts: Sequence[str]) -> dict[str, Any]:
    """The contract's input as numpy, for callers of LoadedModel.run."""
    return {INPUT_KEY: np.array([t.encode("utf-8") for t in texts], dtype=object).reshape([len(texts)])}
