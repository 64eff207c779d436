"""The baselines ESP's model is measured against, on the same split: TF-IDF + logistic regression
(scikit-learn, trained on the same training split) and alt-profanity-check (what a user would
otherwise `pip install`; trained on data that includes Jigsaw's training set, so optimistic here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# The variants reported side by side. "word+char" is the standard strong Jigsaw baseline (word
# uni/bigrams and character 2-5-grams, sublinear TF); "word" alone is the weaker textbook one.
TFIDF_VARIANTS = ("word+char", "word")


def tfidf_logreg(
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    eval_texts: Sequence[str] | dict[str, Sequence[str]],
    variant: str = "word+char",
    c: float = 4.0,
    max_features: int = 200_000,
) -> dict[str, np.ndarray]:
    """Fits one logistic regression per label on TF-IDF features; returns probabilities per eval set."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if variant not in TFIDF_VARIANTS:
        raise ValueError(f"unknown TF-IDF variant {variant!r}")
    sets = eval_texts if isinstance(eval_texts, dict) else {"eval": eval_texts}
    vectorizers = [
        TfidfVectorizer(sublinear_tf=True, strip_accents="unicode", analyzer="word", token_pattern=r"(?u)\b\w+\b",  # nosec B106: a regex, not a password
                        ngram_range=(1, 2), min_df=2, max_features=max_features)
    ]
    if variant == "word+char":
        vectorizers.append(
            TfidfVectorizer(sublinear_tf=True, strip_accents="unicode", analyzer="char_wb", ngram_range=(2, 5),
                            min_df=3, max_features=max_features)
        )
    x_train = hstack([v.fit_transform(train_texts) for v in vectorizers]).tocsr()
    x_eval = {name: hstack([v.transform(texts) for v in vectorizers]).tocsr() for name, texts in sets.items()}
    out = {name: np.zeros((x.shape[0], train_labels.shape[1]), np.float32) for name, x in x_eval.items()}
    for j in range(train_labels.shape[1]):
        y = train_labels[:, j]
        if y.min() == y.max():
            for name in out:
                out[name][:, j] = float(y[0])
            continue
        clf = LogisticRegression(C=c, solver="liblinear", max_iter=1000)
        clf.fit(x_train, y)
        for name, x in x_eval.items():
            out[name][:, j] = clf.predict_proba(x)[:, 1]
    return out


def profanity_check_scores(texts: Sequence[str]) -> np.ndarray:
    """alt-profanity-check's single offensiveness probability per text."""
    from profanity_check import predict_prob

    return np.asarray(predict_prob(list(texts)), dtype=np.float32)
