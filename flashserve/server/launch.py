"""``serve``: build an engine, wrap it in an ``EngineDriver`` and the FastAPI app, and run it with uvicorn.

The server owns its process, so once start-up is done it moves every object alive then (the model, the caches,
the tokenizer: ~400,000 objects for a small model) into the collector's permanent generation (``gc.freeze``):
later collections no longer walk them, which on the development CPU took the host's median step at 256 requests
from 963 to 918 µs and its slowest of 200 from 1,396 to 1,289 µs, and spares serving the occasional full
collection of them all (165 ms in one step of 200, measured by the host-step work). Unfrozen before exit, so that
extension objects are released in order.
"""
import gc
import logging
import os

import uvicorn

from flashserve.config import Config
from flashserve.engine.llm_engine import LLMEngine
from flashserve.server.app import build_app
from flashserve.server.driver import EngineDriver
from flashserve.server.options import ServerOptions

logger = logging.getLogger(__name__)


def default_model_name(model: str) -> str:
    """The name a model directory is served under by default: its basename."""
    return os.path.basename(os.path.normpath(model))


def serve(model: str, options: ServerOptions, **engine_options) -> None:
    """Serve ``model`` (a local checkpoint directory) until interrupted.

    Args:
        model: the checkpoint directory.
        options: where and how to listen (``ServerOptions``).
        engine_options: ``Config`` options (dtype, device, max_model_len, max_num_seqs, ...).

    Raises ValueError for an invalid model directory, engine or server option, before listening.
    """
    options.check()
    engine = LLMEngine(Config(model=model, **engine_options))
    if not engine.is_driver:  # another rank under torchrun: run rank 0's steps until it stops serving
        from flashserve.engine.input_buffers import SHUTDOWN

        _freeze_start_up_objects()
        try:
            while engine.follow() != SHUTDOWN:
                pass
        finally:
            gc.unfreeze()
            engine.close()
        return
    name = options.served_model_name or default_model_name(model)
    driver = EngineDriver(engine)
    app = build_app(driver, name, options)
    logger.info(startup_line(engine, name, options))
    _freeze_start_up_objects()
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.uvicorn_log_level)
    finally:
        gc.unfreeze()
        driver.close()
        engine.stop_followers()
        engine.close()


def _freeze_start_up_objects() -> None:
    """Collect once, then leave every object alive out of later collections (module docstring)."""
    gc.collect()
    gc.freeze()


def startup_line(engine: LLMEngine, name: str, options: ServerOptions) -> str:
    """One line saying what is served and where: model, architecture, dtype, device (and tensor-parallel ranks),
    context, KV cache, graphs."""
    runner = engine.runner
    graphs = runner.graphs
    graph_text = f"CUDA graphs for batch 1..{graphs.max_size}" if graphs is not None else "no CUDA graphs"
    blocks = runner.num_kv_blocks
    ranks = engine.config.tensor_parallel_size
    device = f"{runner.device} + {ranks - 1} tensor-parallel ranks" if ranks > 1 else str(runner.device)
    return (f"serving {name!r} ({runner.spec.architecture}, {str(runner.dtype).removeprefix('torch.')}, "
            f"{device}, max_model_len {engine.max_model_len}, KV cache {blocks} blocks = "
            f"{blocks * runner.block_size} tokens, {graph_text}"
            f"{', API key required' if options.api_key else ''}) on http://{options.host}:{options.port}"
            f"{' (chat page at /)' if options.ui else ''}")
