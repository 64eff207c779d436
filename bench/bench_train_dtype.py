"""Why the minilm profile trains in bfloat16: one MiniLM training step and one inference batch in
float32 and in mixed_bfloat16, side by side in one run (each in its own process, so the global
Keras dtype state cannot leak from one into the other).

    python bench/bench_train_dtype.py [--pretrained .cache/pretrained/all-minilm-l6-v2] [--steps 5]

Needs the fetched weights (`make pretrained`). Prints seconds per training step (batch 32 x 64
pieces, AdamW) and per inference batch, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "mixed_bfloat16")


def measure(pretrained: str, dtype: str, steps: int, batch: int, length: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(REPO_ROOT))
    from training.model import with_dtype
    from training.pretrained import load_pretrained

    backbone, _ = load_pretrained(pretrained)
    backbone = with_dtype(backbone, dtype)
    ids = keras.Input((None,), dtype="int32")
    mask = keras.Input((None,), dtype="bool")
    seq = backbone({"token_ids": ids, "segment_ids": keras.ops.zeros_like(ids), "padding_mask": mask})["sequence_output"]
    logits = keras.layers.Dense(6, dtype="float32")(keras.layers.GlobalAveragePooling1D(dtype="float32")(seq))
    model = keras.Model([ids, mask], logits)
    model.compile(optimizer=keras.optimizers.AdamW(5e-5), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.integers(1000, 20000, (batch, length)).astype("int32")
    m = np.ones_like(x, bool)
    y = rng.integers(0, 2, (batch, 6)).astype("float32")
    model.train_on_batch([x, m], y)  # traces
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch([x, m], y)
    train_s = (time.perf_counter() - t0) / steps
    infer = tf.function(lambda a, b: model([a, b], training=False))
    infer(x, m)
    t0 = time.perf_counter()
    for _ in range(steps):
        infer(x, m)
    return {"dtype": dtype, "train_step_s": train_s, "infer_batch_s": (time.perf_counter() - t0) / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=str(REPO_ROOT / ".cache" / "pretrained" / "all-minilm-l6-v2"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--one", choices=DTYPES, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.pretrained, args.one, args.steps, args.batch, args.length)))
        return 0
    results = []
    for dtype in DTYPES:
        out = subprocess.run([sys.executable, __file__, "--one", dtype, "--pretrained", args.pretrained, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--length", str(args.length)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MiniLM, batch {args.batch} x {args.length} pieces, {args.steps} steps each")
    print(f"{'dtype':>16} {'train step s':>13} {'inference s':>12}")
    for r in results:
        print(f"{r['dtype']:>16} {r['train_step_s']:>13.2f} {r['infer_batch_s']:>12.3f}")
    f32, bf16 = results
    print(f"bfloat16 speed-up: training x{f32['train_step_s'] / bf16['train_step_s']:.1f}, inference x{f32['infer_batch_s'] / bf16['infer_batch_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
