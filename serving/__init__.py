"""Model serving for ESP: the TF Serving gRPC client (`serving.client`, no TensorFlow), the
in-process SavedModel scorer (`serving.saved_model`), the local TF-Serving-compatible server
behind `esp serve` (`serving.server`, `serving.batching`, `serving.model_config`,
`serving.local`), and the production TF Serving config (`serving/config/`, `serving/Dockerfile`).
docs/serving.md describes them.
"""
