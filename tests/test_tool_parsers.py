"""Tool-call parsers on known model outputs: Hermes blocks (Qwen2.5/Qwen3) and Llama 3.1's JSON, several calls in
one reply, malformed JSON (plain content), and the streaming split between content and held text."""
import json

import pytest

from flashserve.server.tool_parsers import HermesParser, Llama3JsonParser, ParsedCall, ToolArrayParser
from flashserve.server.tools import ToolPlan

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "UTC"}}'


def _calls(*pairs):
    return [ParsedCall(name, json.dumps(arguments)) for name, arguments in pairs]


@pytest.mark.parametrize("text, content, calls", [
    (f"<tool_call>\n{WEATHER}\n</tool_call>", None,
     _calls(("get_weather", {"city": "Paris", "unit": "celsius"}))),
    (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n", "Let me check.\n",
     _calls(("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "UTC"}))),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, _calls(("f", {"x": 1}))),
    ('<tool_call>{"name": "f"}</tool_call>', None, _calls(("f", {}))),
    ("The weather is nice.", "The weather is nice.", []),
    ('<tool_call>{"name": "f", "arguments": {"x": </tool_call>', None, None),  # malformed JSON
    (f"<tool_call>\n{WEATHER}\n", None, None),  # never closed
    ('<tool_call>{"arguments": {}}</tool_call>', None, None),  # no name
    (f"<tool_call>{WEATHER}</tool_call> and then some prose", None, None),
])
def test_hermes(text, content, calls):
    parsed = HermesParser().parse(text)
    assert parsed == ((text, []) if calls is None else (content, calls))


@pytest.mark.parametrize("text, calls", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', _calls(("get_weather", {"city": "Paris"}))),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": [1, 2]}}',
     _calls(("a", {}), ("b", {"k": [1, 2]}))),
    ('  {"name": "a", "parameters": {"x": "y"}}\n', _calls(("a", {"x": "y"}))),
    ("Paris is sunny today.", None),
    ('{"name": "a", "parameters": {"x": }', None),  # malformed JSON
    ('{"city": "Paris"}', None),  # JSON, but not a call
    ('{"name": "a", "parameters": {}} trailing words', None),
])
def test_llama3_json(text, calls):
    parsed = Llama3JsonParser().parse(text)
    assert parsed == ((text, []) if calls is None else (None, calls))


def test_tool_array():
    assert ToolArrayParser().parse('[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]') == (
        None, _calls(("a", {"x": 1}), ("b", {})))
    assert ToolArrayParser().parse('[{"name": "a", "argu') == ('[{"name": "a", "argu', [])


@pytest.mark.parametrize("parser, pieces", [
    (HermesParser(), ["Sure", ", let me look. <tool", "_call>\n", WEATHER, "\n</tool_call>", "\n<tool_call>", TIME,
                      "</tool_call>"]),
    (HermesParser(), ["Just text <to", "ols> here", ""]),
    (HermesParser(), ["Text <tool_call>", '{"name": "x", "arguments": {', "</tool_call>"]),  # malformed
    (Llama3JsonParser(), ["<|python", "_tag|>", '{"name": "a", ', '"parameters": {"q": 1}}']),
    (Llama3JsonParser(), ["Hello", " there"]),
    (Llama3JsonParser(), ["{", '"oops"']),
])
def test_streams_agree_with_the_whole_reply(parser, pieces):
    plan = ToolPlan("auto", [], parser=parser)
    stream = plan.stream()
    content, calls = "", []
    for index, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, index == len(pieces) - 1)
        content += text
        calls += deltas
    message, finish_reason = plan.message("".join(pieces), "stop")
    assert content == (message["content"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert finish_reason == ("tool_calls" if calls else "stop") == stream.finish_reason("stop")


def test_hermes_streams_content_before_the_call_at_once():
    stream = ToolPlan("auto", [], parser=HermesParser()).stream()
    assert stream.feed("Hello <tool", False) == ("Hello ", [])  # "<tool" may start a call: held
    assert stream.feed("box>", False) == ("<toolbox>", [])
    assert stream.feed(" <tool_call>{", False) == (" ", [])


def test_named_function_streams_its_arguments():
    plan = ToolPlan("named", [], function_name="get_weather")
    stream = plan.stream()
    first = stream.feed('{"city": ', False)[1]
    second = stream.feed('"Paris"}', True)[1]
    assert first[0]["function"] == {"name": "get_weather", "arguments": '{"city": '} and first[0]["id"]
    assert second == [{"index": 0, "function": {"arguments": '"Paris"}'}}]
    assert stream.finish_reason("stop") == "stop"
    message, finish_reason = plan.message('{"city": "Paris"}', "stop")
    assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
