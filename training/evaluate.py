"""The evaluation report: the exported model on the held-out test split, beside the baselines.

Scores come from the exported SavedModel's serving signature (what ships, not the in-memory Keras
model). Written to the report directory: metrics.json, roc_curves.png, training_curves.png (when
the training history is known) and report.md. Precision and recall at the shipped thresholds are
given at natural prevalence (training.metrics explains the reweighting).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training import metrics as M

logger = logging.getLogger(__name__)

PROFANITY_CHECK_CAVEAT = (
    "alt-profanity-check was trained on data that includes Jigsaw's training set, which this test split "
    "is drawn from: its figures here are optimistic. It returns one offensiveness score, compared against every label."
)


def score_saved_model(version_dir: str | Path, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(labels, probabilities [n, labels], truncated [n]) from the serving signature, batched by length."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer ops the graph uses; loading fails without)
    from tqdm import tqdm

    from training.export import SIGNATURE_NAME, TRUNCATED_OUTPUT

    fn = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_NAME]
    labels = [k for k in fn.structured_outputs if not k.startswith("esp_")]
    info_path = Path(version_dir) / "assets.extra" / "esp_model_info.json"
    if info_path.is_file():
        labels = json.loads(info_path.read_text())["labels"]  # the trained order
    order = np.argsort([len(t) for t in texts], kind="stable")
    probs = np.zeros((len(texts), len(labels)), np.float32)
    truncated = np.zeros(len(texts), bool)
    with tqdm(total=len(texts), desc="scoring", unit="rows", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out = fn(text=tf.constant([texts[i] for i in idx], tf.string))
            probs[idx] = np.stack([out[l].numpy() for l in labels], axis=1)
            truncated[idx] = out[TRUNCATED_OUTPUT].numpy()
            bar.update(len(idx))
    return labels, probs, truncated


def label_metrics(labels: Sequence[str], y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> dict:
    roc = M.roc_aucs(labels, y, p)
    return {
        "mean_roc_auc": M.mean_auc(roc),
        "roc_auc": roc,
        "pr_auc": M.pr_aucs(labels, y, p),
        "pr_auc_natural": M.pr_aucs(labels, y, p, weights),
    }


def demo_check(version_dir: str | Path, sample_path: str | Path, top: int = 10) -> dict:
    """Of the `top` sample comments the model scores most toxic, how many are labelled toxic."""
    rows = [json.loads(line) for line in Path(sample_path).read_text().splitlines() if line.strip()]
    labels, probs, _ = score_saved_model(version_dir, [r["text"] for r in rows])
    j = labels.index("toxic")
    best = np.argsort(-probs[:, j], kind="stable")[:top]
    hits = sum(int(rows[i]["labels"]["toxic"]) for i in best)
    return {"sample": str(sample_path), "top": top, "labelled_toxic": hits, "ids": [rows[i]["id"] for i in best]}


def evaluate(
    version_dir: str | Path,
    data_dir: str,
    report_dir: str | Path,
    *,
    baselines: bool = True,
    natural_prevalence: float = M.NATURAL_TOXIC_PREVALENCE,
    history: list[dict] | None = None,
    sample_path: str | Path | None = None,
    progress: bool = False,
    compare_with: str | Path | None = None,
    resamples: int = 2000,
) -> dict:
    """`compare_with`: another exported model, scored on the same test rows; the result then holds
    the paired bootstrap interval of (this model - that one) in mean ROC AUC."""
    from training import records
    from training.baselines import profanity_check_scores, tfidf_logreg
    from training.export import read_model_info

    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    info = read_model_info(version_dir)
    labels = info["labels"]
    # The test rows' labels are a bare list of numbers in the data's order: data prepared with
    # other labels, or the same ones in another order, would score each label against another's
    # answers (or fail deep in TensorFlow on a count that differs).
    data_labels = list(records.labels_of(records.read_stats(data_dir), data_dir))
    if data_labels != list(labels):
        raise records.DataError(f"{data_dir} is labelled {', '.join(data_labels)}; the model {version_dir} has {', '.join(labels)}: "
                                "evaluate it on data prepared with its labels, in its order")
    test = records.read_split(data_dir, "test", len(labels))
    weights = M.natural_weights(test.labels[:, labels.index("toxic")] if "toxic" in labels else np.zeros(len(test)), natural_prevalence)

    t0 = time.monotonic()
    _, probs, truncated = score_saved_model(version_dir, test.texts, progress=progress)
    scoring_s = time.monotonic() - t0
    result: dict = {
        "model": {
            "version_dir": str(version_dir),
            "profile": info.get("profile", {}).get("name") if isinstance(info.get("profile"), dict) else info.get("profile"),
            **label_metrics(labels, test.labels, probs, weights),
            "thresholds": {},
            "truncated_fraction": float(truncated.mean()) if len(truncated) else 0.0,
            "scoring_seconds": round(scoring_s, 1),
        },
        "test_rows": len(test),
        "natural_toxic_prevalence": natural_prevalence,
        "data_prevalence": {l: float(test.labels[:, j].mean()) for j, l in enumerate(labels)},
    }
    for j, l in enumerate(labels):
        thr = float(info["thresholds"][l])
        prec, rec = M.precision_recall_at(test.labels[:, j], probs[:, j], weights, thr)
        result["model"]["thresholds"][l] = {
            "threshold": thr,
            "rule": info.get("threshold_rules", {}).get(l),
            "test_precision_natural": prec,
            "test_recall_natural": rec,
        }
    curves = {"model": probs}
    if compare_with is not None:
        from training.compare import NotComparable, paired_bootstrap

        other_labels, other, _ = score_saved_model(compare_with, test.texts, progress=progress)
        missing = [l for l in labels if l not in other_labels]
        if missing:
            raise NotComparable(f"{compare_with} has no output for {', '.join(missing)}: it is another task")
        other = other[:, [other_labels.index(l) for l in labels]]
        d = paired_bootstrap(test.labels, other, probs, resamples=resamples)
        result["compared_with"] = {"version_dir": str(compare_with), "mean_roc_auc": d.mean_auc_a, "difference": d.difference,
                                   "low": d.low, "high": d.high, "confidence": d.confidence, "resamples": d.resamples,
                                   "share_not_better": d.share_not_better}
    if baselines:
        train = records.read_split(data_dir, "train", len(labels))
        t0 = time.monotonic()
        tfidf = tfidf_logreg(train.texts, train.labels, test.texts, variant="word+char")["eval"]
        result["tfidf_logreg"] = {"variant": "word 1-2-grams + char_wb 2-5-grams, sublinear TF, C=4", **label_metrics(labels, test.labels, tfidf, weights), "fit_seconds": round(time.monotonic() - t0, 1)}
        t0 = time.monotonic()
        tfidf_word = tfidf_logreg(train.texts, train.labels, test.texts, variant="word")["eval"]
        result["tfidf_logreg_word"] = {"variant": "word 1-2-grams, sublinear TF, C=4", **label_metrics(labels, test.labels, tfidf_word, weights), "fit_seconds": round(time.monotonic() - t0, 1)}
        curves["tfidf_logreg"] = tfidf
        # A profanity score says nothing about another task's labels (a model from `esp train
        # --label-columns ...` on other data): compare it only where there is a toxic label.
        if "toxic" in labels:
            pc = profanity_check_scores(test.texts)
            pc_matrix = np.repeat(pc[:, None], len(labels), axis=1)
            result["profanity_check"] = {"caveat": PROFANITY_CHECK_CAVEAT, **label_metrics(labels, test.labels, pc_matrix, weights)}
            curves["profanity_check"] = pc_matrix
        result["model_minus_tfidf_mean_roc_auc"] = result["model"]["mean_roc_auc"] - result["tfidf_logreg"]["mean_roc_auc"]
    if sample_path and Path(sample_path).is_file() and "toxic" in labels:
        result["demo_check"] = demo_check(version_dir, sample_path)
    plot_roc_curves(labels, test.labels, curves, report / "roc_curves.png")
    if history:
        plot_training_curves(history, report / "training_curves.png", info.get("wide_only_dev_mean_roc_auc"))
        result["history"] = history
    (report / "metrics.json").write_text(json.dumps(_clean(result), indent=2, sort_keys=True) + "\n")
    (report / "report.md").write_text(render_markdown(result, info))
    return result


def _clean(obj):
    """NaN is not JSON: write null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def plot_roc_curves(labels: Sequence[str], y: np.ndarray, curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    cols = 3
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for j, label in enumerate(labels):
        ax = axes[j // cols][j % cols]
        for name, p in curves.items():
            if 0 < y[:, j].sum() < len(y):
                fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
                auc = M.roc_aucs([label], y[:, [j]], p[:, [j]])[label]
                ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})", linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(label)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    for k in range(len(labels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("ROC curves on the held-out test split")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, wide_only_dev_auc: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set_title("training loss (weighted BCE)")
    a.set_xlabel("epoch")
    b.plot(epochs, [h["dev_mean_roc_auc"] for h in history], marker="o", color="tab:green", label="model")
    if wide_only_dev_auc is not None:
        b.axhline(wide_only_dev_auc, color="tab:orange", linestyle="--", label="wide part alone (before epoch 1)")
        b.legend(fontsize=8)
    b.set_title("dev mean ROC AUC")
    b.set_xlabel("epoch")
    for ax in (a, b):
        ax.set_xticks(epochs)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_markdown(result: dict, info: dict) -> str:
    labels = info["labels"]
    systems = [("model", "ESP model")]
    if "tfidf_logreg" in result:
        systems += [("tfidf_logreg", "TF-IDF word+char + LogReg"), ("tfidf_logreg_word", "TF-IDF word + LogReg")]
    if "profanity_check" in result:
        systems.append(("profanity_check", "alt-profanity-check*"))
    lines = [
        f"# Evaluation report: {info.get('profile', {}).get('name', '?') if isinstance(info.get('profile'), dict) else info.get('profile')}",
        "",
        f"Held-out test split: {result['test_rows']} comments. Exported with TensorFlow {info.get('tensorflow_version')}.",
        "",
        "## ROC AUC per label (test split)",
        "",
        "| system | mean | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for key, name in systems:
        r = result[key]
        lines.append(f"| {name} | **{r['mean_roc_auc']:.4f}** | " + " | ".join(f"{r['roc_auc'][l]:.4f}" for l in labels) + " |")
    lines += ["", "## PR AUC per label (test split as sampled / reweighted to natural prevalence)", "",
              "| system | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name in systems:
        r = result[key]
        lines.append(f"| {name} | " + " | ".join(f"{r['pr_auc'][l]:.3f} / {r['pr_auc_natural'][l]:.3f}" for l in labels) + " |")
    lines += ["", "## Shipped thresholds (chosen on dev at natural prevalence) and how they do on test", "",
              "| label | threshold | rule | precision (natural) | recall (natural) |", "|---|---|---|---|---|"]
    for l in labels:
        t = result["model"]["thresholds"][l]
        lines.append(f"| {l} | {t['threshold']:.3f} | {t['rule']} | {t['test_precision_natural']:.3f} | {t['test_recall_natural']:.3f} |")
    if "profanity_check" in result:
        lines += ["", f"\\* {PROFANITY_CHECK_CAVEAT}"]
    if "demo_check" in result:
        d = result["demo_check"]
        lines += ["", f"Demo check: of the {d['top']} sample comments scored most toxic, {d['labelled_toxic']} are labelled toxic."]
    if "compared_with" in result:
        c = result["compared_with"]
        lines += ["", f"Against {c['version_dir']} (mean ROC AUC {c['mean_roc_auc']:.4f}) on the same test rows: "
                  f"{c['difference']:+.4f}, {c['confidence']:.0%} CI [{c['low']:+.4f}, {c['high']:+.4f}] (paired bootstrap, {c['resamples']} resamples)."]
    lines += ["", "Figures: `roc_curves.png`, `training_curves.png`. All numbers: `metrics.json`.", ""]
    return "\n".join(lines)
