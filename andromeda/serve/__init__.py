"""The OpenAI-compatible server: `scheduler` (continuous batching over a slot pool), `app`
(FastAPI routes), `protocol` (request and response shapes), `metrics` (Prometheus)."""
