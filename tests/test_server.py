"""The OpenAI-compatible server, served by uvicorn on an ephemeral port of 127.0.0.1 from a thread, on a tiny
random-weight checkpoint with the PyTorch reference attention: endpoints, streaming, parity with ``LLM.generate``,
usage, concurrency, 400s naming the field, and aborts when clients disconnect."""
import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time

import httpx
import pytest

# The GPU image has no server stack unless its wheels are carried (see benchmarks/serving_gpu.sh): skip there.
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from flashserve import LLM, SamplingParams  # noqa: E402
from flashserve.cli import main  # noqa: E402
from flashserve.config import Config  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.models.checkpoint import write_random_checkpoint  # noqa: E402
from flashserve.server import EngineDriver, build_app  # noqa: E402
from flashserve.server import launch  # noqa: E402
from flashserve.server.launch import startup_line  # noqa: E402
from flashserve.server.options import ServerOptions  # noqa: E402
from http_helpers import wait_until_healthy  # noqa: E402

MODEL_NAME = "tiny-llama"
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=96, max_model_len=128)
PROMPTS = ["Hello, my name is", "The sky", "a b c d e f g h i j"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("server-llama")), "LlamaForCausalLM", seed=11)


@contextlib.contextmanager
def _running_server(model_dir: str, engine_options: dict, options: ServerOptions | None = None):
    """Serve ``model_dir`` from a thread on an ephemeral port of 127.0.0.1; yields (base URL, driver)."""
    driver = EngineDriver(LLMEngine(Config(model=model_dir, **engine_options)))
    app = build_app(driver, MODEL_NAME, options)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", driver
    finally:
        uvicorn_server.should_exit = True
        thread.join(10)
        driver.close()
        sock.close()


@contextlib.contextmanager
def reference_server(model_dir: str, options: ServerOptions | None = None, **engine_options):
    """``_running_server`` with ENGINE_OPTIONS (updated by ``engine_options``) and ``options``, the reference
    attention forced while it runs."""
    previous = os.environ.get("FLASHSERVE_ATTENTION_BACKEND")
    os.environ["FLASHSERVE_ATTENTION_BACKEND"] = "torch"
    try:
        with _running_server(model_dir, dict(ENGINE_OPTIONS, **engine_options), options) as running:
            yield running
    finally:
        if previous is None:
            os.environ.pop("FLASHSERVE_ATTENTION_BACKEND", None)
        else:
            os.environ["FLASHSERVE_ATTENTION_BACKEND"] = previous


@pytest.fixture(scope="module")
def server(model_dir):
    """(base URL, driver) of a running server; the reference attention is forced for the module."""
    with reference_server(model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def reference(model_dir, server):
    """Greedy completions of PROMPTS by ``LLM.generate`` (8 tokens, EOS ignored), one prompt at a time."""
    llm = LLM(model_dir, **ENGINE_OPTIONS)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [llm.generate([prompt], params, use_tqdm=False)[0] for prompt in PROMPTS]


def _engine_state(driver: EngineDriver) -> tuple[bool, int, int]:
    """(has unfinished requests, free KV blocks, pool size), read in the engine thread."""
    def read(engine):
        return engine.has_unfinished(), engine.block_manager.num_free_blocks, engine.block_manager.num_blocks
    return driver.submit(read).result(timeout=10)


def _wait_idle(driver: EngineDriver) -> None:
    """Wait until the engine has no unfinished request, then check that no KV block is left in use."""
    deadline = time.monotonic() + 10
    while _engine_state(driver)[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    unfinished, free, total = _engine_state(driver)
    assert not unfinished and free == total


def _events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent-event response (JSON decoded, ``[DONE]`` kept as is)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _generated_tokens(driver: EngineDriver) -> int:
    return driver.submit(lambda engine: engine.stats.generated_tokens).result(timeout=10)


def test_health_and_models(client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == ENGINE_OPTIONS["max_model_len"]


def test_completion_matches_llm_generate(client, reference):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    result = client.post("/v1/completions", json=body).json()
    expected = reference[0]
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == MODEL_NAME and isinstance(result["created"], int)
    assert result["choices"][0]["text"] == expected.outputs[0].text
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 8,
                               "total_tokens": len(expected.prompt_token_ids) + 8}
    by_ids = client.post("/v1/completions", json=dict(body, prompt=expected.prompt_token_ids)).json()
    assert by_ids["choices"][0]["text"] == expected.outputs[0].text and by_ids["id"] != result["id"]


def test_batch_of_prompts(client, reference):
    body = {"prompt": [PROMPTS[1], reference[2].prompt_token_ids], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    result = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert [c["text"] for c in result["choices"]] == [reference[1].outputs[0].text, reference[2].outputs[0].text]
    assert result["usage"]["completion_tokens"] == 16
    assert result["usage"]["prompt_tokens"] == len(reference[1].prompt_token_ids) + len(reference[2].prompt_token_ids)


def test_streaming_completion_concatenates_to_the_whole_text(client, server):
    body = {"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    stream_body = dict(body, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/completions", json=stream_body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["usage"] is None
               for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    _wait_idle(server[1])


def test_chat_completion_streamed_and_not(client, model_dir):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    body = {"messages": messages, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True}
    result = client.post("/v1/chat/completions", json=body).json()
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 6
    llm_messages = [messages[0], {"role": "user", "content": "Hello\nthere"}]
    llm = LLM(model_dir, **ENGINE_OPTIONS)
    expected = llm.chat(llm_messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert choice["message"]["content"] == expected[0].outputs[0].text
    assert result["usage"]["prompt_tokens"] == len(expected[0].prompt_token_ids)
    with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as response:
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs_and_stop_strings(client, reference):
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == reference[0].outputs[0].text
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                     "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(entry["top_logprobs"]) == 2 and entry["bytes"] for entry in content)
    text = reference[0].outputs[0].text
    stop = text[3:5]
    stopped = client.post("/v1/completions", json=dict(body, stop=stop, logprobs=None)).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[:text.index(stop)]


def test_detokenization_happens_outside_the_engine_thread(server, client, model_dir, monkeypatch):
    """The engine thread only steps: every output text (stop strings included) is built in the event loop's
    thread, and a request stopped there ends exactly as ``LLM.generate`` ends it (text, tokens, usage)."""
    from flashserve.engine.detokenizer import OutputText
    threads = set()
    add = OutputText.add

    def recording_add(self, *args):
        threads.add(threading.current_thread().name)
        return add(self, *args)

    monkeypatch.setattr(OutputText, "add", recording_add)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(model_dir, **ENGINE_OPTIONS)
    text = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    expected = llm.generate([PROMPTS[1]], stopped, use_tqdm=False)[0].outputs[0]
    threads.clear()
    body = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    answer = client.post("/v1/completions", json=body).json()
    streamed = client.post("/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert threads and "flashserve-engine" not in threads
    assert answer["choices"][0]["text"] == expected.text and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids) == chunks[-1]["usage"]["completion_tokens"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text
    _wait_idle(server[1])


def test_concurrent_requests(server, reference):
    async def run_all():
        async with httpx.AsyncClient(base_url=server[0], timeout=30) as http:
            requests = []
            for index in range(6):
                body = {"prompt": PROMPTS[index % 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                        "stream": index % 2 == 1}
                requests.append(http.post("/v1/completions", json=body))
            return await asyncio.gather(*requests)

    responses = asyncio.run(run_all())
    for index, response in enumerate(responses):
        if index % 2:
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in response.text.splitlines()
                           if line.startswith("data: {"))
        else:
            text = response.json()["choices"][0]["text"]
        assert text == reference[index % 3].outputs[0].text
    _wait_idle(server[1])


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/completions", {"logprobs": 50}, "logprobs"),
    ("/v1/completions", {"seed": 1 << 70}, "seed"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [10**6]}, "prompt"),
    ("/v1/completions", {"prompt": [7] * 200}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", ""], "stream": True}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    # Fields the server does not implement, or misspells of real ones: refused, never ignored.
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"temprature": 0}, "temprature"),
    ("/v1/completions", {"stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"tools": []}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    # Text JSON allows and no tokenizer accepts.
    ("/v1/completions", {"prompt": "x\ud800y"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "x\udfffy"]}, "prompt"),
    ("/v1/completions", {"stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]}, "messages"),
    # No room for max_tokens within max_model_len (128): a 400, not a shortened answer.
    ("/v1/completions", {"prompt": [7] * 100, "max_tokens": 29}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 200}, "max_completion_tokens"),
])
def test_bad_fields_are_400_naming_the_field(client, server, path, fields, param):
    base = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    body = json.dumps(dict(base, **fields))  # ASCII JSON: lone surrogates travel as \ud800 escapes
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    _wait_idle(server[1])


def test_n_completions_seed_and_logit_bias(client):
    body = {"prompt": ["Hello", "The sky"], "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7,
            "ignore_eos": True, "best_of": 3}
    first = client.post("/v1/completions", json=body).json()
    assert [choice["index"] for choice in first["choices"]] == list(range(6))
    texts = [choice["text"] for choice in first["choices"]]
    assert len(set(texts[:3])) > 1  # three different samples of the first prompt
    assert client.post("/v1/completions", json=body).json()["choices"] == first["choices"]  # reproducible
    one = client.post("/v1/completions", json=dict(body, prompt="Hello", n=1, best_of=None)).json()
    prompt_tokens = sum(client.post("/tokenize", json={"prompt": p}).json()["count"] for p in body["prompt"])
    assert first["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once, not n times
    assert first["usage"]["completion_tokens"] == 6 * 6
    assert one["choices"][0]["text"] == texts[0]  # copy 0 of a seeded request samples like n = 1
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 4, "n": 2, "stream": True}) as response:
        indices = {event["choices"][0]["index"] for event in _events(response)[:-1] if event["choices"]}
    assert indices == {0, 1}
    biased = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "logit_bias": {"42": 100}}).json()
    assert biased["choices"][0]["logprobs"] is None
    tokens = client.post("/tokenize", json={"prompt": biased["choices"][0]["text"],
                                            "add_special_tokens": False}).json()["tokens"]
    assert set(tokens) == {42}


def test_room_for_max_tokens_and_user_are_accepted(client):
    body = {"prompt": [7] * 100, "max_tokens": 28, "ignore_eos": True, "user": "someone"}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 28


def test_lone_surrogate_keeps_the_connection_usable(client):
    raw = b'{"prompt": "x\\ud800y", "max_tokens": 2}'
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_non_json_bodies_are_415(client):
    response = client.post("/v1/completions", content=b"prompt=Hi", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post("/v1/chat/completions", content=b"{}")
    assert response.status_code == 415
    response = client.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 2}',
                           headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_info_routes(client):
    assert client.head("/health").status_code == 200
    assert client.get("/version").json()["version"]
    assert client.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    tokens = client.post("/tokenize", json={"prompt": "Hello, my name is"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 128
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Hello, my name is"
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2
    for bad, param in (({}, "prompt"), ({"prompt": "a", "messages": []}, "prompt"), ({"tokens": [-1]}, "tokens")):
        route = "/detokenize" if "tokens" in bad else "/tokenize"
        response = client.post(route, json=bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_openapi_documents_the_real_statuses(client):
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in responses and {"200", "400", "415"} <= set(responses)
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://x"}).headers


def test_api_key_and_cors(model_dir, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    origin = "http://app.example"
    with _running_server(model_dir, ENGINE_OPTIONS, ServerOptions(api_key="s3cret", allowed_origins=origin)) \
            as (base_url, _), \
            httpx.Client(base_url=base_url, timeout=30) as http:
        preflight = http.options("/v1/completions", headers={"Origin": origin,
                                                              "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        response = http.get("/health", headers={"Origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
        body = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200


def test_waiting_queue_bound_and_request_log(model_dir, monkeypatch, caplog):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    options = ServerOptions(max_waiting_requests=1, log_requests=True)
    logger = logging.getLogger("flashserve")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="flashserve"), \
            _running_server(model_dir, ENGINE_OPTIONS, options) as (base_url, driver), \
            httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        two = http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})  # 0 + 2 waiting > 1
        assert two.status_code == 503 and two.json()["error"]["code"] == "server_overloaded"
    assert any("request cmpl-" in record.getMessage() for record in caplog.records)


def test_oversized_bodies_are_413(client):
    response = client.post("/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_long_prompts_do_not_stall_running_streams(server):
    """A 3 MB prompt is tokenized (for seconds) in the tokenizer thread while a running stream keeps receiving
    tokens; it is then refused (longer than max_model_len)."""
    base_url, driver = server
    _wait_idle(driver)
    huge = " ".join(f"word{index}" for index in range(300_000))

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            chunk_times = []

            async def stream():
                body = {"prompt": "Hi", "max_tokens": 120, "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk_times.append(time.perf_counter())
                            if len(chunk_times) == 5:
                                started.set()

            async def flood():
                await started.wait()
                sent = time.perf_counter()
                response = await http.post("/v1/completions", json={"prompt": huge, "max_tokens": 4})
                return sent, time.perf_counter(), response

            started = asyncio.Event()
            _, (sent, answered, response) = await asyncio.gather(stream(), flood())
            return chunk_times, sent, answered, response

    chunk_times, sent, answered, response = asyncio.run(run())
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert sum(sent < t < answered for t in chunk_times) >= 3
    _wait_idle(driver)


def test_unknown_model_and_invalid_json(client):
    response = client.post("/v1/completions", json={"model": "other", "prompt": "Hi"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert response.json()["error"]["code"] == "model_not_found"
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_disconnected_clients_abort_their_requests(server):
    base_url, driver = server
    _wait_idle(driver)
    body = {"prompt": "Hi", "max_tokens": 120, "ignore_eos": True}
    before = _generated_tokens(driver)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
    _wait_idle(driver)
    streamed = _generated_tokens(driver) - before

    async def give_up_once_running():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            request = asyncio.ensure_future(http.post("/v1/completions", json=dict(body, prompt="Hello")))
            while not await driver.run(lambda engine: engine.has_unfinished()):
                await asyncio.sleep(0.005)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(give_up_once_running())
    _wait_idle(driver)
    assert 1 <= streamed < 120 and _generated_tokens(driver) - before - streamed < 120


def _metrics(client) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value} (comments dropped)."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_after_a_burst_with_disconnects(server, client):
    base_url, driver = server
    _wait_idle(driver)
    before = _metrics(client)
    label = f'{{model_name="{MODEL_NAME}"}}'

    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            async def one(index):
                body = {"prompt": PROMPTS[index % 3], "max_tokens": 40, "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if index % 3 == 0 and line.startswith("data: {"):
                            return  # a third of the clients go away after their first chunk
            await asyncio.gather(*(one(index) for index in range(9)))

    asyncio.run(burst())
    _wait_idle(driver)
    after = _metrics(client)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[f"flashserve:{gauge}{label}"] == 0.0
    gained = lambda name: after.get(name, 0.0) - before.get(name, 0.0)
    assert gained(f"flashserve:generation_tokens_total{label}") >= 6 * 40
    assert gained(f"flashserve:prompt_tokens_total{label}") > 0
    success = f'flashserve:request_success_total{{finished_reason="%s",model_name="{MODEL_NAME}"}}'
    assert gained(success % "length") == 6 and gained(success % "abort") == 3
    assert gained(f"flashserve:time_to_first_token_seconds_count{label}") == 9
    assert gained(f"flashserve:e2e_request_latency_seconds_count{label}") == 6
    assert gained(f"flashserve:inter_token_latency_seconds_count{label}") >= 6 * 39
    for name in ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert f"flashserve:{name}{label}" in after


def test_serve_command_reports_a_bad_model_directory(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu", "--port", "0"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--model", "other", "--port", "0"]) == 2
    assert "two models" in capsys.readouterr().err


def test_serve_command_end_to_end(model_dir, tmp_path):
    """``python -m flashserve serve DIR`` as a user runs it: the start-up line, a completion with the API key from
    the environment, the CORS header, a chat template file, and a clean exit on SIGTERM."""
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    env = dict(os.environ, FLASHSERVE_ATTENTION_BACKEND="torch", FLASHSERVE_API_KEY="k3y")
    command = [sys.executable, "-m", "flashserve", "serve", model_dir, "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "64", "--block-size", "4",
               "--allowed-origins", "http://app.example", "--chat-template", str(template),
               "--uvicorn-log-level", "warning"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(httpx, base_url)
        headers = {"Authorization": "Bearer k3y", "Origin": "http://app.example"}
        name = os.path.basename(model_dir)
        response = httpx.post(base_url + "/v1/completions", headers=headers, timeout=30,
                              json={"model": name, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.post(base_url + "/v1/completions", json={"prompt": "Hi"}, timeout=30).status_code == 401
        tokens = httpx.post(base_url + "/tokenize", timeout=30,
                            json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
        prompt = httpx.post(base_url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]
        assert prompt == "Hi\n"  # the template file's rendering
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: a SIGTERM exit status, no traceback.
    assert process.returncode in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr
    assert f"serving '{os.path.basename(model_dir)}' (LlamaForCausalLM" in stderr and "API key required" in stderr


def test_serve_command_checks_port_and_template_before_loading(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("flashserve.server.launch.LLMEngine", no_loading)
    monkeypatch.setattr("flashserve.cli._model_or_demo", no_loading)
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["serve", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "0", "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "chat template" in capsys.readouterr().err


def test_startup_line_says_what_is_served(model_dir, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    engine = LLMEngine(Config(model=model_dir, **ENGINE_OPTIONS))
    line = startup_line(engine, MODEL_NAME, ServerOptions(port=1234, api_key="k"))
    for part in ("'tiny-llama'", "LlamaForCausalLM", "float32", "cpu", "max_model_len 128", "96 blocks = 384 tokens",
                 "no CUDA graphs", "API key required", "http://127.0.0.1:1234"):
        assert part in line


@pytest.mark.gpu
def test_server_on_cuda_streams_what_it_answers(model_dir, monkeypatch):
    monkeypatch.delenv("FLASHSERVE_ATTENTION_BACKEND", raising=False)  # the Triton kernels, not the reference
    options = dict(ENGINE_OPTIONS, device="cuda", dtype="float16", num_kv_blocks=None)
    with _running_server(model_dir, options) as (base_url, driver), httpx.Client(base_url=base_url) as http:
        body = {"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        whole = http.post("/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        with http.stream("POST", "/v1/completions", json=dict(body, stream=True), timeout=120) as response:
            events = _events(response)
        assert events[-1] == "[DONE]" and "".join(c["choices"][0]["text"] for c in events[:-1]) == whole
        _wait_idle(driver)


def test_serve_freezes_the_start_up_objects_while_it_listens(model_dir, monkeypatch):
    """``serve`` leaves the objects alive after start-up out of the collector's walks while uvicorn runs, and
    gives them back to it before returning."""
    frozen_while_running = []
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    monkeypatch.setattr(launch.uvicorn, "run",
                        lambda app, **kwargs: frozen_while_running.append(gc.get_freeze_count()))
    launch.serve(model_dir, ServerOptions(), **ENGINE_OPTIONS)
    assert frozen_while_running and frozen_while_running[0] > 0
    assert gc.get_freeze_count() == 0
