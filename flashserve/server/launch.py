"""``serve``: build an engine, wrap it in an ``EngineDriver`` and the FastAPI app, and run it with uvicorn."""
import logging
import os
import socket
from dataclasses import dataclass

import uvicorn

from flashserve.config import Config
from flashserve.engine.llm_engine import LLMEngine
from flashserve.server.app import DEFAULT_MAX_PROMPT_BYTES, build_app
from flashserve.server.driver import EngineDriver

logger = logging.getLogger(__name__)


def default_model_name(model: str) -> str:
    """The name a model directory is served under by default: its basename."""
    return os.path.basename(os.path.normpath(model))


@dataclass(slots=True)
class ServerOptions:
    """How the server listens and what it adds around the engine.

    Attributes:
        host, port: where to listen.
        served_model_name: the name clients pass as ``model`` (None: the model directory's basename).
        api_key: when set, every ``/v1/*`` route requires ``Authorization: Bearer <api_key>``.
        allowed_origins: comma-separated origins CORS allows (``*`` for any); None leaves CORS off.
        chat_template: a Jinja chat template file that replaces the tokenizer's.
        uvicorn_log_level: uvicorn's log level.
        max_prompt_bytes: the largest request body accepted (413 above it).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allowed_origins: str | None = None
    chat_template: str | None = None
    uvicorn_log_level: str = "info"
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES

    def check(self) -> None:
        """ValueError for a port outside 0..65535 or one that cannot be bound, or an unreadable chat template —
        called before the model loads, so that a typo costs no start-up."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        try:
            with socket.create_server((self.host, self.port)):
                pass
        except OSError as error:
            raise ValueError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"chat template file {self.chat_template!r} does not exist")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")


def serve(model: str, options: ServerOptions, **engine_options) -> None:
    """Serve ``model`` (a local checkpoint directory) until interrupted.

    Args:
        model: the checkpoint directory.
        options: where and how to listen (``ServerOptions``).
        engine_options: ``Config`` options (dtype, device, max_model_len, max_num_seqs, ...).

    Raises ValueError for an invalid model directory, engine or server option, before listening.
    """
    options.check()
    chat_template = None
    if options.chat_template is not None:
        with open(options.chat_template) as template:
            chat_template = template.read()
    engine = LLMEngine(Config(model=model, **engine_options))
    name = options.served_model_name or default_model_name(model)
    driver = EngineDriver(engine)
    origins = None
    if options.allowed_origins is not None:
        origins = [origin.strip() for origin in options.allowed_origins.split(",") if origin.strip()]
    app = build_app(driver, name, options.api_key, origins, chat_template, options.max_prompt_bytes)
    logger.info(startup_line(engine, name, options))
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.uvicorn_log_level)
    finally:
        driver.close()


def startup_line(engine: LLMEngine, name: str, options: ServerOptions) -> str:
    """One line saying what is served and where: model, architecture, dtype, device, context, KV cache, graphs."""
    runner = engine.runner
    graphs = runner.graphs
    graph_text = f"CUDA graphs for batch 1..{graphs.max_size}" if graphs is not None else "no CUDA graphs"
    blocks = runner.num_kv_blocks
    return (f"serving {name!r} ({runner.spec.architecture}, {str(runner.dtype).removeprefix('torch.')}, "
            f"{runner.device}, max_model_len {engine.max_model_len}, KV cache {blocks} blocks = "
            f"{blocks * runner.block_size} tokens, {graph_text}"
            f"{', API key required' if options.api_key else ''}) on http://{options.host}:{options.port}")
