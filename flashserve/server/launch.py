"""``serve``: build an engine, wrap it in an ``EngineDriver`` and the FastAPI app, and run it with uvicorn."""
import os

import uvicorn

from flashserve.config import Config
from flashserve.engine.llm_engine import LLMEngine
from flashserve.server.app import build_app
from flashserve.server.driver import EngineDriver


def default_model_name(model: str) -> str:
    """The name a model directory is served under by default: its basename."""
    return os.path.basename(os.path.normpath(model))


def serve(model: str, host: str, port: int, served_model_name: str | None = None, **engine_options) -> None:
    """Serve ``model`` (a local checkpoint directory) on http://host:port until interrupted.

    Args:
        model: the checkpoint directory.
        host, port: where to listen.
        served_model_name: the name clients pass as ``model`` (default: the directory's basename).
        engine_options: ``Config`` options (dtype, device, max_model_len, max_num_seqs, ...).

    Raises ValueError for an invalid model directory or engine option, before listening.
    """
    engine = LLMEngine(Config(model=model, **engine_options))
    driver = EngineDriver(engine)
    app = build_app(driver, served_model_name or default_model_name(model))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        driver.close()
