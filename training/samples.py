"""Builds data/sample_comments.jsonl: a small, deterministic, stratified sample of the TEST split.

The demo and the docs score these comments; drawing them from the held-out split keeps the demo
fair (the model never trained on them). Each line: {"id", "text", "labels": {label: 0|1}}.
Regenerate with `python -m training.samples [DATA_DIR] [OUT]` after `esp prepare-data`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from training import records

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "sample_comments.jsonl"
MAX_TEXT_CHARS = 1000


def build_sample(data_dir: str, toxic: int = 120, clean: int = 280) -> list[dict]:
    """`toxic` toxic and `clean` non-toxic test comments (up to MAX_TEXT_CHARS each), rare labels first."""
    labels = records.read_stats(data_dir)["labels"]
    test = records.read_split(data_dir, "test", len(labels))
    # A fixed pseudo-random order: sha256 of the id, so the sample is the same on every machine.
    order = sorted(range(len(test)), key=lambda i: hashlib.sha256(("sample:" + test.ids[i]).encode()).hexdigest())
    order = [i for i in order if len(test.texts[i]) <= MAX_TEXT_CHARS]
    t = labels.index("toxic")
    picked: list[int] = []
    # Rare labels first, so threats and identity hate are in the sample at all.
    for rare in ("threat", "identity_hate", "severe_toxic"):
        if rare in labels:
            j = labels.index(rare)
            picked += [i for i in order if test.labels[i, j] > 0 and i not in picked][:10]
    picked += [i for i in order if test.labels[i, t] > 0 and i not in picked][: max(0, toxic - len(picked))]
    picked += [i for i in order if test.labels[i, t] == 0][:clean]
    picked.sort(key=order.index)
    return [
        {"id": test.ids[i], "text": test.texts[i], "labels": {l: int(test.labels[i, j]) for j, l in enumerate(labels)}}
        for i in picked
    ]


def main(argv: list[str]) -> None:
    data_dir = argv[0] if argv else "artifacts/data"
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    rows = build_sample(data_dir)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    toxic = sum(r["labels"]["toxic"] for r in rows)
    sys.stdout.write(f"wrote {len(rows)} comments ({toxic} toxic) to {out}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
