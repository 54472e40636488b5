"""Structured outputs and tool calling through the server with the ``openai`` client (random weights, reference
attention): response_format, vLLM's structured_outputs and guided_* extras, 400s naming the field, tools with
tool_choice none/auto/required/named, streamed tool_calls deltas, and tool messages in the conversation."""
import json

import pytest

from flashserve.models.checkpoint import write_random_checkpoint
from flashserve.server.options import ServerOptions
from flashserve.server.prompts import chat_messages
from flashserve.server.protocol import ChatMessage
from test_server import MODEL_NAME, reference_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a", "b"]}}}]
SCHEMAS = {"get_weather": WEATHER, "add": TOOLS[1]["function"]["parameters"]}
TEMPLATE = ("{% if tools %}<|tools|>{% for tool in tools %}{{ tool.function.name }} {% endfor %}</s>{% endif %}"
            "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}"
            "{% for call in message.tool_calls or [] %}{{ call.function.name }}({{ call.function.arguments.city }})"
            "{% endfor %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "user", "content": "What is the weather?"}]
HERMES_CALL = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'
               r'</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("structured-llama")
    model_dir = write_random_checkpoint(str(directory / "model"), "LlamaForCausalLM", seed=13)
    (directory / "template.jinja").write_text(TEMPLATE)
    options = ServerOptions(chat_template=str(directory / "template.jinja"), tool_call_parser="hermes")
    with reference_server(model_dir, options, max_model_len=512, num_kv_blocks=512) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=kwargs.pop("messages", MESSAGES),
                                          max_tokens=kwargs.pop("max_tokens", 60), **kwargs)


def test_response_format_json_schema_and_json_object(client):
    response = _chat(client, n=3, temperature=1.0, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    response = _chat(client, temperature=0, max_tokens=40, response_format={"type": "json_object"})
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    assert _chat(client, max_tokens=3, response_format={"type": "text"}).choices[0].message.content is not None


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda text: text in ("alpha", "beta")),
    ({"structured_outputs": {"json": PERSON}}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ({"guided_json": json.dumps(PERSON)}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ({"guided_regex": "[0-9]{3}-[a-c]{2}"}, lambda text: len(text) == 6 and text[3] == "-"),
    ({"guided_choice": ["up", "down"]}, lambda text: text in ("up", "down")),
    ({"guided_grammar": 'root ::= "(" [xyz] ")"'}, lambda text: text in ("(x)", "(y)", "(z)")),
])
def test_vllm_extras(client, extra, check):
    response = _chat(client, temperature=0.8, seed=3, extra_body=extra)
    assert response.choices[0].finish_reason == "stop" and check(response.choices[0].message.content)
    completion = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=60, extra_body=extra)
    assert completion.choices[0].finish_reason == "stop" and check(completion.choices[0].text)


def test_openai_parse_with_a_pydantic_model(client):
    """The client's own structured-outputs helper: a pydantic model becomes a strict json_schema."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=30)

    completion = client.chat.completions.parse(model=MODEL_NAME, messages=MESSAGES, max_tokens=60, temperature=0.7,
                                               seed=2, response_format=Pet)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and len(pet.name) <= 8


def test_streamed_json_schema(client):
    stream = _chat(client, stream=True, seed=4, temperature=1.0,
                   response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "frob"}}}}, "guided_json"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= nowhere"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ({"tools": []}, "tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
])
def test_invalid_constraints_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, extra_body=fields)
    assert error.value.body["param"] == param, error.value.body


def test_named_tool_choice_validates(client):
    response = _chat(client, tools=TOOLS, n=4, temperature=1.0, seed=5,
                     tool_choice={"type": "function", "function": {"name": "add"}})
    for choice in response.choices:
        assert choice.message.content is None and choice.finish_reason == "stop"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])


def test_required_tool_choice_validates(client):
    response = _chat(client, tools=TOOLS, n=4, temperature=1.0, seed=6, tool_choice="required", max_tokens=400)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls and len({c.id for c in choice.message.tool_calls}) == len(
            choice.message.tool_calls)
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    single = _chat(client, tools=TOOLS, temperature=1.0, seed=6, tool_choice="required", max_tokens=400,
                   parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls(client):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        stream = _chat(client, tools=TOOLS, tool_choice=tool_choice, stream=True, temperature=0, max_tokens=400)
        calls, finish = {}, None
        for chunk in stream:
            for delta in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
                entry["arguments"] += delta.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert calls and finish == ("tool_calls" if tool_choice == "required" else "stop")
        for entry in calls.values():
            assert entry["id"].startswith("call_")
            jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_auto_parses_hermes_calls(client):
    """With tool_choice auto the reply is parsed: a regex makes the random model write a Hermes call."""
    response = _chat(client, tools=TOOLS, extra_body={"guided_regex": HERMES_CALL}, max_tokens=80, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    stream = _chat(client, tools=TOOLS, extra_body={"guided_regex": HERMES_CALL}, max_tokens=80, stream=True,
                   temperature=0)
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [d for chunk in chunks for d in chunk.choices[0].delta.tool_calls or []]
    assert [d.function.arguments for d in deltas] == [call.function.arguments]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = _chat(client, tools=TOOLS, max_tokens=5, temperature=0)  # random text: no calls in it
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_tools_reach_the_template_and_tool_messages_are_accepted(client):
    without = _chat(client, max_tokens=1).usage.prompt_tokens
    with_tools = _chat(client, max_tokens=1, tools=TOOLS, tool_choice="none")
    assert with_tools.usage.prompt_tokens > without and with_tools.choices[0].message.tool_calls is None
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert _chat(client, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=2).choices
    rendered = chat_messages([ChatMessage(**message) for message in conversation])
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    assert rendered[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
