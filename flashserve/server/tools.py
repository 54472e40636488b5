"""Tool calling in chat completions: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` -> a ``ToolPlan``.

- The tools (OpenAI's ``{"type": "function", "function": {name, description, parameters}}``) go to the chat
  template (``apply_chat_template(tools=...)``) unless there are none.
- ``tool_choice`` defaults to "auto" with tools and "none" without. "none": a plain reply. "auto": the reply is
  parsed for calls by the server's ``--tool-call-parser`` (``flashserve.server.tool_parsers``; without one, "auto"
  is a 400 as in vLLM). "required": the output is constrained to a JSON array of ``{"name", "arguments"}`` objects,
  each valid under its tool's parameters schema (one call when ``parallel_tool_calls`` is false). A named function
  (``{"type": "function", "function": {"name"}}``): the output is constrained to that function's arguments.
- Replies with calls carry OpenAI's ``tool_calls`` (``call_<hex>`` ids, names, JSON-string arguments) and content
  null (or the text before the calls); ``finish_reason`` is "tool_calls" ("stop" for a named function, as OpenAI).
  Streams send text content while it is certainly content, then the calls as ``tool_calls`` deltas when the reply
  ends (a named function's arguments stream as they are generated).
"""
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from flashserve.sampling_params import StructuredOutputsParams
from flashserve.server.errors import InvalidRequestError
from flashserve.server.structured import check_grammar
from flashserve.server.tool_parsers import TOOL_CALL_PARSERS, ParsedCall, ToolArrayParser

ANY_OBJECT = {"type": "object"}


class FunctionDefinition(BaseModel):
    """A tool's function: its name, description and JSON schema of its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of ``tools`` (only functions exist)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    """The function a named ``tool_choice`` picks."""

    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class ToolFields(BaseModel):
    """The tool fields of a chat request."""

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self, parser_name: str | None) -> "ToolPlan":
        """The plan of this request under the server's ``--tool-call-parser`` (None: none); InvalidRequestError
        naming the field for empty or duplicate tools, a choice without tools or naming an unknown function, and
        "auto" without a parser."""
        tools = self.tools
        if tools is not None and not tools:
            raise InvalidRequestError("tools must not be empty (leave the field out)", "tools")
        names = [tool.function.name for tool in tools or ()]
        if any(not name for name in names) or len(set(names)) != len(names):
            raise InvalidRequestError(f"tools need distinct, non-empty function names, got {names}", "tools")
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        template_tools = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
        if choice == "none":
            return ToolPlan("none", template_tools)
        if not tools:
            raise InvalidRequestError("tool_choice other than 'none' needs tools", "tool_choice")
        if choice == "auto":
            if parser_name is None:
                raise InvalidRequestError("tool_choice 'auto' needs the server started with --tool-call-parser "
                                          f"({' or '.join(TOOL_CALL_PARSERS)})", "tool_choice")
            return ToolPlan("auto", template_tools, parser=TOOL_CALL_PARSERS[parser_name]())
        if choice == "required":
            schema = {"type": "array", "minItems": 1,
                      "items": {"anyOf": [_call_schema(tool.function) for tool in tools]}}
            if self.parallel_tool_calls is False:
                schema["maxItems"] = 1
            constraint = StructuredOutputsParams(json=schema)
            check_grammar(constraint, "tools")
            return ToolPlan("required", template_tools, constraint, parser=ToolArrayParser())
        function = next((tool.function for tool in tools if tool.function.name == choice.function.name), None)
        if function is None:
            raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                      f"among the tools {names}", "tool_choice")
        constraint = StructuredOutputsParams(json=function.parameters or ANY_OBJECT)
        check_grammar(constraint, "tools")
        return ToolPlan("named", template_tools, constraint, function_name=function.name)


def _call_schema(function: FunctionDefinition) -> dict:
    """The schema of one call of ``function`` in a "required" reply."""
    return {"type": "object", "properties": {"name": {"const": function.name},
                                             "arguments": function.parameters or ANY_OBJECT},
            "required": ["name", "arguments"], "additionalProperties": False}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_body(call: ParsedCall) -> dict:
    """OpenAI's ``tool_calls`` entry of a call (with a fresh id)."""
    return {"id": _call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass(slots=True)
class ToolPlan:
    """How a chat request uses tools.

    Attributes:
        mode: "none", "auto", "required" or "named".
        template_tools: the tools as the chat template takes them (None: no tools).
        constraint: the output constraint ("required", "named"), or None.
        parser: what finds the calls in the reply ("auto", "required"), or None.
        function_name: the function of "named".
    """

    mode: str
    template_tools: list[dict] | None
    constraint: StructuredOutputsParams | None = None
    parser: object | None = None
    function_name: str | None = None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole reply, and its finish reason."""
        content, calls = self._calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {"role": "assistant", "content": content, "tool_calls": [tool_call_body(c) for c in calls]}
        return message, self._finish_reason(finish_reason)

    def _calls(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.mode == "named":
            return None, [ParsedCall(self.function_name, text)]
        if self.parser is None:
            return text, []
        return self.parser.parse(text)

    def _finish_reason(self, finish_reason: str | None) -> str | None:
        if finish_reason != "stop" or self.mode == "named":
            return finish_reason
        return "tool_calls"

    def stream(self) -> "ReplyStream":
        """A new stream state for one choice."""
        return ReplyStream(self)


@dataclass(slots=True)
class ReplyStream:
    """One streamed choice: turns text deltas into ``(content delta, tool_calls deltas)``."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0
    calls: list[dict] = field(default_factory=list)

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        """The content to send and the ``tool_calls`` deltas after ``delta``; ``finished``: the reply ended."""
        self.text += delta
        plan = self.plan
        if plan.mode == "named":
            first = not self.calls
            if first:
                self.calls.append({"id": _call_id()})
            if not (first or delta):
                return "", []
            function = {"name": plan.function_name, "arguments": delta} if first else {"arguments": delta}
            head = {"id": self.calls[0]["id"], "type": "function"} if first else {}
            return "", [dict({"index": 0}, **head, function=function)]
        if plan.parser is None:
            return delta, []
        if not finished:
            end = max(self.sent, plan.parser.content_end(self.text))
            content, self.sent = self.text[self.sent:end], end
            return content, []
        content, calls = plan.parser.parse(self.text)
        if not calls:
            content, self.sent = self.text[self.sent:], len(self.text)
            return content, []
        rest = (content or "")[self.sent:]
        self.calls = [tool_call_body(call) for call in calls]
        return rest, [dict({"index": index}, **call) for index, call in enumerate(self.calls)]

    def finish_reason(self, finish_reason: str | None) -> str | None:
        """The finish reason to send (with the last delta)."""
        return self.plan._finish_reason(finish_reason) if self.calls else finish_reason
