"""The built-in chat page: ``GET /`` (the HTML) and ``GET /ui/{file}`` (its CSS and JavaScript), plain files shipped
in ``flashserve/server/ui`` (nothing is fetched from the network, there is no build step).

The page talks to the OpenAI routes of the same server: ``/v1/models`` for the model's name, and streamed
``/v1/chat/completions`` with the sampling fields it shows (temperature, top p, max tokens, seed, a system prompt);
it shows each reply's tokens/s, and its Stop button aborts the request (the server aborts what a disconnected
client asked for). With ``--api-key`` the page itself loads freely and asks for the key at the first 401 (kept in
the browser's localStorage). ``--no-ui`` leaves these routes out.
"""
import os

from fastapi import FastAPI
from fastapi.responses import FileResponse

from flashserve.server.errors import InvalidRequestError

UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")
ASSETS = {"chat.css": "text/css", "chat.js": "text/javascript"}


def add_chat_page(app: FastAPI) -> None:
    """Add the page's routes to ``app``."""

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(os.path.join(UI_DIR, "index.html"), media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def chat_asset(name: str):
        if name not in ASSETS:
            raise InvalidRequestError(f"no such file: {name}", status_code=404, code="not_found")
        return FileResponse(os.path.join(UI_DIR, name), media_type=ASSETS[name],
                            headers={"Cache-Control": "no-cache"})
