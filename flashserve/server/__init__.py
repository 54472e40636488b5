"""An OpenAI-compatible HTTP server over ``LLMEngine``: ``flashserve serve`` (see ``flashserve.server.launch``).

- ``driver``: ``EngineDriver``, the one thread that owns and steps the engine, and ``RequestStream``.
- ``protocol``: request bodies and their mapping onto ``SamplingParams``; ``InvalidRequestError``.
- ``prompts``: completion prompts and chat messages -> engine prompts.
- ``responses``: OpenAI's response and stream-chunk bodies.
- ``app``: the FastAPI routes (``build_app``).
- ``launch``: build the engine and run the app with uvicorn (``serve``).
"""
from flashserve.server.app import build_app
from flashserve.server.driver import EngineDriver, RequestStream

__all__ = ["EngineDriver", "RequestStream", "build_app"]
