"""The options of ``flashserve serve`` that are not the engine's: where to listen and what the app adds."""
import os
import socket
from dataclasses import dataclass

from flashserve.server.tool_parsers import TOOL_CALL_PARSERS

DEFAULT_MAX_PROMPT_BYTES = 4 << 20


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
        max_waiting_requests: the most requests waiting for the engine; over it a new request gets a 503 (None:
            unbounded, as vLLM).
        log_requests: log each request (id, prompts, prompt tokens, sampling parameters) at INFO.
        ui: serve the chat page at ``/`` (``flashserve.server.chat_page``).
        tool_call_parser: how replies of chat requests with ``tool_choice: "auto"`` are parsed for tool calls
            ("hermes" or "llama3_json", see ``flashserve.server.tool_parsers``); None: "auto" is refused.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allowed_origins: str | None = None
    chat_template: str | None = None
    uvicorn_log_level: str = "info"
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_waiting_requests: int | None = None
    log_requests: bool = False
    tool_call_parser: str | None = None
    ui: bool = True

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
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_CALL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}")

    @property
    def origins(self) -> list[str] | None:
        """``allowed_origins`` as a list (None: CORS off)."""
        if self.allowed_origins is None:
            return None
        return [origin.strip() for origin in self.allowed_origins.split(",") if origin.strip()]

    def read_chat_template(self) -> str | None:
        """The chat template file's text (None when there is none)."""
        if self.chat_template is None:
            return None
        with open(self.chat_template) as template:
            return template.read()
