"""`pensieve serve`: the engine behind an OpenAI-compatible HTTP API.

- `routing`: which conversation a request continues (session id, else the longest kept prefix).
- `loop`: the engine on its own thread; requests join and leave at step boundaries.
- `protocol`: the OpenAI request bodies (pydantic) and error objects.
- `metrics`: Prometheus counters and gauges of the engine and its cache.
- `app`: the HTTP endpoints (FastAPI); `command`: the `serve` verb.
"""
