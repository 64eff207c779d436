"""ESP's model pipeline: tokenisation, the BERT classifier, training, export and evaluation.

Heavy (imports TensorFlow); the CLI imports these modules inside its command functions only.
Module map: `profiles` (model sizes and schedules), `preprocess` (the one in-graph tokeniser used
by training and serving), `records` (the prepared-data format), `model`, `train`, `thresholds`,
`export` (TF Serving layout, the model contract), `evaluate` (report and baselines),
`pretrained` (fine-tuning from a user's BERT).
"""

DEFAULT_LABELS: tuple[str, ...] = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
