"""The scoring worker: Pub/Sub comments in, micro-batches to the model, scores (or dead letters) out.

`worker.service.Worker` runs it; `worker.batcher` and `worker.leases` hold its pure logic (tested
with injected time); `worker.local.WorkerProcess` starts `esp worker run` for tests, the demo and
the benchmark. docs/worker.md describes the design and its measured figures.
"""
