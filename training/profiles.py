"""Training profiles: the model size and schedule behind `esp train --profile`.

A profile is the whole recipe, so `--profile demo` on two machines trains the same thing. Sizes
are in hidden units and layers; times are measured on the 2-core development machine (see
docs/training.md for the numbers and for what was tried).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    num_layers: int
    num_heads: int
    hidden_dim: int
    intermediate_dim: int
    max_seq_len: int
    dropout: float = 0.1
    # Wide part: a linear model over hashed word-piece uni- and bigrams of the first
    # `wide_max_tokens` pieces, added to the encoder's logits in the same graph (0 = off).
    wide_bigram_buckets: int = 0
    wide_max_tokens: int = 256
    # Hashed character 2-5-grams within words of the first `wide_max_chars` characters, in the
    # same wide part (0 = off): what TF-IDF's char analyzer sees, computed in the graph.
    wide_char_buckets: int = 0
    wide_max_chars: int = 2000
    # "joint": the wide table is learned with the encoder. "logreg": it is first fitted by
    # L2-regularised logistic regression (C = wide_logreg_c) on the same in-graph features with
    # IDF weights, then frozen, and the encoder learns what it misses (docs/training.md).
    wide_fit: str = "joint"
    wide_logreg_c: float = 4.0
    # With "logreg": train the encoder against k-fold out-of-fold wide logits (0 = in-sample), so
    # it does not learn to trust wide logits that were fitted on the very rows it trains on.
    wide_oof_folds: int = 0
    batch_size: int = 32
    epochs: int = 3
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    # Positive-class loss weight per label = min((negatives/positives) ** power, cap).
    pos_weight_power: float = 0.5
    pos_weight_cap: float = 10.0
    early_stopping_patience: int = 2
    # Cap on training rows (0 = all): the tiny profile trains on a slice so tests take seconds.
    max_train_rows: int = 0
    max_dev_rows: int = 0
    pooling: str = "cls_mean"  # "cls" (BERT's pooled output), "mean", or both concatenated
    # Dev evaluations (checkpoint, early stopping) per epoch: more than one when an epoch is long
    # and one or two epochs are all there is time for (fine-tuning a pretrained encoder on CPU).
    evals_per_epoch: int = 1
    # Pretrained weights the profile fine-tunes when --pretrained is not given: a name that
    # training.weights resolves to its verified cache directory (None: trained from scratch).
    pretrained: str | None = None
    # Distillation (`--teacher`): the encoder's loss is (1 - distill_alpha) x the class-weighted
    # loss on the labels + distill_alpha x cross-entropy against the teachers' probabilities.
    distill_alpha: float = 0.5
    # With teachers: fit the wide part's logistic regression on the same blend of labels and soft
    # targets, instead of on the labels alone.
    distill_wide: bool = False
    # The encoder's compute dtype while training. "mixed_bfloat16" (float32 weights, bfloat16
    # matmuls) trains MiniLM about 3x faster on CPUs with AMX/AVX512-BF16 (measured here); the
    # export is float32 either way, so any CPU serves it (docs/training.md).
    train_dtype: str = "float32"


# The wide n-gram part the default model ships with. The minilm profile keeps it unchanged, so a
# fine-tuned encoder is compared with the default on the encoder alone (docs/training.md).
SHIPPED_WIDE_PART: dict = dict(
    wide_bigram_buckets=1 << 18,
    wide_max_tokens=384,
    wide_char_buckets=1 << 19,
    wide_max_chars=3000,
    wide_fit="logreg",
)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="tiny",
            description="For tests: a 1-layer, 32-wide BERT on a slice of the data; seconds.",
            num_layers=1,
            num_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            max_seq_len=32,
            wide_bigram_buckets=1024,
            wide_max_tokens=64,
            batch_size=32,
            epochs=1,
            learning_rate=2e-3,
            max_train_rows=600,
            max_dev_rows=300,
            early_stopping_patience=1,
        ),
        Profile(
            name="demo",
            description="For the demo: a 1-layer, 64-wide BERT plus the wide n-gram part; a few minutes on 2 cores.",
            num_layers=1,
            num_heads=2,
            hidden_dim=64,
            intermediate_dim=128,
            max_seq_len=96,
            wide_bigram_buckets=1 << 17,
            wide_max_tokens=256,
            wide_char_buckets=1 << 18,
            wide_max_chars=2000,
            wide_fit="logreg",
            batch_size=64,
            epochs=2,
            learning_rate=2e-3,
            early_stopping_patience=1,
        ),
        Profile(
            name="default",
            description="The shipped model: a 2-layer, 128-wide BERT plus the wide n-gram part; about 10 minutes on 2 cores.",
            num_layers=2,
            num_heads=2,
            hidden_dim=128,
            intermediate_dim=512,
            max_seq_len=128,
            **SHIPPED_WIDE_PART,
            batch_size=32,
            epochs=3,
            learning_rate=1e-3,
            early_stopping_patience=1,
        ),
        Profile(
            name="minilm",
            description="Fine-tunes all-MiniLM-L6-v2 (pretrained, 6 layers, 384 wide; `esp pretrained fetch`) plus the wide n-gram part.",
            # The encoder's size comes from the checkpoint; these match it for reference.
            num_layers=6,
            num_heads=12,
            hidden_dim=384,
            intermediate_dim=1536,
            max_seq_len=128,
            **SHIPPED_WIDE_PART,
            batch_size=32,
            # One epoch is what 2 cores afford (over an hour); dev is evaluated twice within it.
            epochs=1,
            learning_rate=5e-5,
            warmup_fraction=0.06,
            # sentence-transformers trained it with mean pooling; its [CLS] pooler was never tuned.
            pooling="mean",
            train_dtype="mixed_bfloat16",
            evals_per_epoch=2,
            early_stopping_patience=2,
            pretrained="all-minilm-l6-v2",
        ),
        Profile(
            name="base",
            description="BERT-base (12 layers, 768 wide) for an accelerator, usually with --pretrained.",
            num_layers=12,
            num_heads=12,
            hidden_dim=768,
            intermediate_dim=3072,
            max_seq_len=256,
            wide_bigram_buckets=0,
            batch_size=32,
            epochs=3,
            learning_rate=3e-5,
            pooling="cls",
        ),
    )
}

DEFAULT_PROFILE = "default"


def get_profile(name: str, **overrides: object) -> Profile:
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(profile, **clean) if clean else profile
