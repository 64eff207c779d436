"""Elastic Synapse Processor: toxicity scoring for user comments on Pub/Sub, TF Serving and Beam.

This package holds what every role shares and what stays light (no TensorFlow, no Beam): the CLI,
typed settings, the wire contracts, the scoring core and the local-stack helper.
"""

__version__ = "0.1.0"
