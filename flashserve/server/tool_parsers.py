"""Tool calls in a model's reply text, in the formats model families are trained on (vLLM's parser names):

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per
  call, after optional plain text (the content).
- ``llama3_json`` (Llama 3.1/3.2): the whole reply is ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``),
  optionally after ``<|python_tag|>``; several calls are separated by ``;``.

``parse(text)`` gives (content or None, calls); a reply whose calls are not all well-formed JSON objects with a
string ``name`` is plain content, as in vLLM. ``content_end(text)`` says how much of a partial reply is certainly
content (streamed at once); the rest is held until the reply ends. A call is ``ParsedCall(name, arguments)`` with
the arguments as JSON text.
"""
import json
from dataclasses import dataclass

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(slots=True, frozen=True)
class ParsedCall:
    """One tool call: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str


def _call(value, arguments_keys: tuple[str, ...]) -> ParsedCall | None:
    """A decoded JSON value -> a call, or None when it is not {"name": str, <an arguments key>: object|str}."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker`` (text that may yet become it)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class HermesParser:
    """``<tool_call>{json}</tool_call>`` blocks."""

    name = "hermes"

    def content_end(self, text: str) -> int:
        start = text.find(HERMES_START)
        return start if start >= 0 else len(text) - _held_prefix(text, HERMES_START)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        start = text.find(HERMES_START)
        if start < 0:
            return text, []
        calls, position = [], start
        while text.startswith(HERMES_START, position):
            end = text.find(HERMES_END, position)
            if end < 0:
                return text, []
            try:
                call = _call(json.loads(text[position + len(HERMES_START):end]), ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
            position = end + len(HERMES_END)
            position += len(text[position:]) - len(text[position:].lstrip())  # whitespace between blocks
        if position < len(text):
            return text, []  # text after the calls: not a tool-call reply
        return text[:start] or None, calls


class Llama3JsonParser:
    """A reply that is one JSON call, or several separated by ``;``, optionally after ``<|python_tag|>``."""

    name = "llama3_json"

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(stripped):
            return 0
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body
        if not body.startswith("{"):
            return text, []
        decoder, calls, position = json.JSONDecoder(), [], 0
        while position < len(body):
            try:
                value, position = decoder.raw_decode(body, position)
            except ValueError:
                return text, []
            call = _call(value, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            rest = body[position:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return text, []
            position = len(body) - len(rest)
        return None, calls


class ToolArrayParser:
    """The reply of ``tool_choice: "required"``: a JSON array of {"name", "arguments"} (the grammar ensures it)."""

    name = "required"

    def content_end(self, text: str) -> int:
        return 0

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        try:
            values = json.loads(text)
        except ValueError:
            return text, []
        calls = [_call(value, ("arguments",)) for value in values] if isinstance(values, list) else [None]
        if not calls or None in calls:
            return text, []
        return None, calls


TOOL_CALL_PARSERS = {parser.name: parser for parser in (HermesParser, Llama3JsonParser)}
"""The parsers ``--tool-call-parser`` names."""
