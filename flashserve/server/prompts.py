"""Request prompts -> the (text, token ids) items ``EngineDriver.add`` queues, one per engine request.

The builders returned here take a tokenizer and run in the server's tokenizer thread (``ServerTokenizer``), never
in the engine thread.
"""
import json
from collections.abc import Callable

import jinja2

from flashserve.server.driver import PromptItem
from flashserve.server.protocol import ChatMessage, InvalidRequestError, check_text


def completion_prompts(prompt: str | list[int] | list[str | list[int]]) -> list[PromptItem]:
    """A completions ``prompt`` -> items: a string or one token-id list is one prompt, a list of either a batch.

    Raises ``InvalidRequestError`` (param "prompt") for an empty list or text that is not valid Unicode (a lone
    surrogate); empty strings and empty token lists are left to the engine, which rejects them.
    """
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        return [(prompt, None)]
    for item in prompt:
        if isinstance(item, str):
            check_text(item, "prompt")
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", "prompt")
    if all(isinstance(token, int) for token in prompt):
        return [(None, list(prompt))]
    return [(item, None) if isinstance(item, str) else (None, list(item)) for item in prompt]


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages -> the dicts a chat template takes; list content is joined text (only "text" parts allowed).

    Raises ``InvalidRequestError`` (param "messages") for no messages, a non-text content part, or text that is
    not valid Unicode (a lone surrogate).
    """
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    result = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(f"messages[{index}].content: only text parts are supported, got a "
                                              f"{part.type!r} part", "messages")
            content = "\n".join(part.text for part in content)
        for value in (content, message.role):
            if isinstance(value, str):
                check_text(value, "messages")
        entry = dict(message.model_dump(exclude_none=True), content=content or "")
        if isinstance(entry.get("tool_calls"), list):
            entry["tool_calls"] = [_template_tool_call(call) for call in entry["tool_calls"]]
        result.append(entry)
    return result


def _template_tool_call(call):
    """An assistant message's tool call as chat templates take it: JSON-string arguments decoded into an object
    (Qwen's and Llama's templates write ``arguments | tojson``), as vLLM does."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return dict(call, function=dict(function, arguments=arguments))


def chat_prompt_builder(messages: list[dict], tools: list[dict] | None = None) -> Callable[[object], list[PromptItem]]:
    """A builder ``build(tokenizer)`` rendering ``messages`` (and ``tools``, OpenAI's tool dicts) with the
    tokenizer's chat template and the generation prompt; it raises ValueError when there is no template or the
    template refuses the messages."""
    def build(tokenizer) -> list[PromptItem]:
        if tokenizer.chat_template is None:
            raise ValueError("the model's tokenizer has no chat template: use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template rejected the messages: {error}") from None
        return [(text, tokenizer.encode(text, add_special_tokens=False))]

    return build
