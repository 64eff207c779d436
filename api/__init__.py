"""ESP's HTTP scoring API (`esp api`): the stream's scoring core behind HTTP, Perspective-compatible.

A thin adapter like the worker: requests are parsed and checked here (`native`, `perspective`),
scored by the shared engine (`esp.engine.ScoringEngine`, micro-batched across requests), and
answered in the stream's score records or Perspective's format. `app` is the ASGI application,
`server` runs it on uvicorn.
"""
