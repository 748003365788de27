"""An OpenAI-compatible HTTP server over the speculative decoder.

``schemas`` (request/response shapes and 400 errors), ``text`` (prompt encoding,
incremental detokenization and stop strings), ``worker`` (the single decode thread that
owns the engine), ``metrics`` (Prometheus text), ``app`` (FastAPI routes) and ``cli``
(``ltd serve``). Only ``cli`` and ``app`` import FastAPI/uvicorn, so the rest can be
tested without them.
"""
