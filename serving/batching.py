"""Server-side batching for `esp serve`: merges concurrent Predict requests into one model call.

It follows TF Serving's BasicBatchScheduler semantics, so the same batching_parameters mean the
same thing locally and in production:
- a batch runs when it holds `max_execution_batch_size` rows or when its first request has waited
  `batch_timeout_micros`, whichever comes first; `num_batch_threads` batches run at once;
- a request larger than `max_batch_size` is refused (INVALID_ARGUMENT);
- with `enable_large_batch_splitting`, a request is split across batches so executed batches
  never exceed `max_execution_batch_size`; without it, batches hold up to `max_batch_size` rows
  and requests are never split;
- beyond `max_enqueued_batches` batches waiting, a request is refused with UNAVAILABLE (the
  client retries it; TF Serving answers the same).
Only requests for the same model version and signature share a batch. Pure Python plus numpy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping

import numpy as np

log = logging.getLogger(__name__)


class BatchingError(Exception):
    """A request the scheduler refuses; `code` is the gRPC status code name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 1024
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100
    enable_large_batch_splitting: bool = True
    max_execution_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_execution_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.num_batch_threads < 1:
            raise ValueError("num_batch_threads must be at least 1")
        if self.max_enqueued_batches < 1:
            raise ValueError("max_enqueued_batches must be at least 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must not be negative")

    @property
    def execution_size(self) -> int:
        return self.max_execution_batch_size if self.enable_large_batch_splitting else self.max_batch_size


class _Task:
    __slots__ = ("key", "inputs", "size", "enqueued", "done", "outputs", "error")

    def __init__(self, key: Hashable, inputs: Mapping[str, np.ndarray], size: int, enqueued: float) -> None:
        self.key = key
        self.inputs = inputs
        self.size = size
        self.enqueued = enqueued
        self.done = threading.Event()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None


RunFn = Callable[[Hashable, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BatchScheduler:
    """Queues requests, forms batches per key, runs them on `num_batch_threads` threads.

    `run(key, inputs)` executes one merged batch; every output must have the batch as its first
    dimension (the model contract guarantees it), so results can be split back per request.
    `on_batch(rows)` is called with each executed batch's size (metrics).
    """

    def __init__(
        self,
        run: RunFn,
        options: BatchingOptions,
        *,
        on_batch: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self.options = options
        self._on_batch = on_batch
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: list[_Task] = []
        self._queued_rows = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs `inputs` as part of a batch and returns this request's rows of the outputs."""
        sizes = {v.shape[0] if v.ndim else 1 for v in inputs.values()}
        if len(sizes) != 1:
            raise BatchingError("INVALID_ARGUMENT", f"inputs disagree on the batch size: {sorted(sizes)}")
        size = sizes.pop()
        opts = self.options
        if size > opts.max_batch_size:
            raise BatchingError(
                "INVALID_ARGUMENT", f"Task size {size} is larger than maximum input batch size {opts.max_batch_size}"
            )
        if size == 0:
            # Nothing to merge: run it alone so the model still answers with empty outputs.
            return dict(self._run(key, inputs))
        step = opts.execution_size
        chunks = [(lo, min(lo + step, size)) for lo in range(0, size, step)]
        now = self._clock()
        tasks = [_Task(key, {k: v[lo:hi] for k, v in inputs.items()}, hi - lo, now) for lo, hi in chunks]
        with self._cond:
            if self._closed:
                raise BatchingError("UNAVAILABLE", "the server is shutting down")
            limit = opts.max_enqueued_batches * opts.execution_size
            if self._queued_rows + size > limit:
                raise BatchingError("UNAVAILABLE", "The batch scheduling queue to which this task was submitted is full")
            self._queue.extend(tasks)
            self._queued_rows += size
            self._cond.notify_all()
        for task in tasks:
            task.done.wait()
        for task in tasks:
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].outputs  # type: ignore[return-value]
        keys = tasks[0].outputs.keys()  # type: ignore[union-attr]
        return {k: np.concatenate([t.outputs[k] for t in tasks]) for k in keys}  # type: ignore[index]

    def _take_batch(self) -> list[_Task] | None:
        """Blocks until a batch is due; returns its tasks (None when closed and drained)."""
        limit = self.options.execution_size
        timeout_s = self.options.batch_timeout_micros / 1e6
        with self._cond:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                first = self._queue[0]
                rows = sum(t.size for t in self._queue if t.key == first.key)
                wait = first.enqueued + timeout_s - self._clock()
                if rows < limit and wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue  # the queue may have changed: another thread may have taken `first`
                batch, total, rest = [], 0, []
                for t in self._queue:
                    if t.key == first.key and total + t.size <= limit:
                        batch.append(t)
                        total += t.size
                    else:
                        rest.append(t)
                self._queue = rest
                self._queued_rows -= total
                return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: list[_Task]) -> None:
        total = sum(t.size for t in batch)
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
            outputs = self._run(batch[0].key, merged)
            if self._on_batch is not None:
                self._on_batch(total)
            offset = 0
            for t in batch:
                part = {}
                for k, v in outputs.items():
                    if v.ndim == 0 or v.shape[0] != total:
                        raise BatchingError(
                            "INTERNAL", f"output {k!r} has shape {list(v.shape)}; batching needs {total} rows first"
                        )
                    part[k] = v[offset : offset + t.size]
                t.outputs = part
                offset += t.size
        except BaseException as exc:  # every member of a failed batch gets the error
            for t in batch:
                t.error = exc
        finally:
            for t in batch:
                t.done.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops accepting requests, runs what is queued, and joins the batch threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout_s)
