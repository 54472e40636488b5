"""The server through real clients: the ``openai`` package (completions, chat, streaming with usage, n, logprobs,
echo, seed, logit_bias, errors), and a few hundred generated malformed requests (each a 4xx with OpenAI's error
body, the server alive afterwards)."""
import json
import random

import httpx
import pytest

from flashserve.models.checkpoint import write_random_checkpoint
from test_server import MODEL_NAME, reference_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(str(tmp_path_factory.mktemp("clients-llama")), "LlamaForCausalLM", seed=12)
    with reference_server(model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completions(client):
    response = client.completions.create(model=MODEL_NAME, prompt=["Hello", "The sky"], max_tokens=5, n=2,
                                         temperature=0.9, seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert all(len(choice.logprobs.tokens) == 5 and len(choice.logprobs.top_logprobs[0]) >= 2
               for choice in response.choices)
    assert response.usage.completion_tokens == 20
    again = client.completions.create(model=MODEL_NAME, prompt=["Hello", "The sky"], max_tokens=5, n=2,
                                      temperature=0.9, seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in response.choices]
    echo = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
    choice = echo.choices[0]
    assert choice.text == "Hello world" and choice.logprobs.token_logprobs[0] is None
    assert all(value <= 0 for value in choice.logprobs.token_logprobs[1:])


def test_logit_bias_and_streaming_usage(client):
    stream = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, logit_bias={"42": 100},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    plain = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, temperature=0,
                                      logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert text == plain.choices[0].text


def test_chat(client):
    messages = [{"role": "user", "content": "Write a haiku"}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=6,
                                              temperature=0, logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and len(choice.logprobs.content) == response.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, n=2)
    texts = ["", ""]
    for chunk in stream:
        for delta in chunk.choices:
            texts[delta.index] += delta.delta.content or ""
    assert texts == [choice.message.content] * 2


def test_errors_are_typed(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, temperature=-1)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    assert error.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="Hi")
    assert [model.id for model in client.models.list()] == [MODEL_NAME]


# Values each field refuses (every one on its own makes a body invalid: wrong type, out of range, unsupported).
INVALID_VALUES = {
    "prompt": [None, 5, 3.5, True, "", [], [None], [[]], [-5], {}, "\ud800"],
    "max_tokens": [-1, 0, 3.5, "x", [], 10 ** 30],
    "temperature": [-1, "hot", [], {}],
    "top_p": [0, 1.5, -1, "x"],
    "n": [0, -1, 17, 2.5, "x"],
    "stop": [[""], [1], 5, {}, ["\udfff"]],
    "logprobs": [-1, 50, "x"],
    "seed": [10 ** 30, 3.5, "x"],
    "stream": ["maybe", 5, []],
    "top_k": [-2, 2.5, "x"],
    "min_p": [-0.1, 1.5, "x"],
    "logit_bias": [{"x": 1}, {"5": 101}, {"100000": 1}, [5], "x"],
    "stream_options": [{"a": 1}, 5, "x"],
    "best_of": [2, 0, "x"],
    "presence_penalty": [3, -3, "x"],
    "min_tokens": [-1, 100, "x"],
    "echo": ["x", []],
    "suffix": ["x"],
    "tools": [[]],
    "frobnicate": [1],
}


def _malformed_bodies(rng: random.Random, count: int) -> list:
    """A valid body with one to three fields given values they refuse, and a few bodies that are not objects."""
    bodies = []
    for _ in range(count):
        body = {"prompt": "Hi", "max_tokens": 2}
        for name in rng.sample(sorted(INVALID_VALUES), rng.randint(1, 3)):
            body[name] = rng.choice(INVALID_VALUES[name])
        bodies.append(body)
    return bodies + [[1, 2], "prompt", 5, None]


def test_malformed_requests_are_all_4xx_with_the_error_body(server):
    base_url, _ = server
    rng = random.Random(0)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for body in _malformed_bodies(rng, 240):
            content = json.dumps(body, allow_nan=True)
            response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        for raw in (b"", b"{", b"[1,", b"\xff\xfe", b"null", b'{"prompt": "Hi", "max_tokens": 2}}'):
            response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500 and response.json()["error"]["message"], raw
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
