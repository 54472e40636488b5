"""The FastAPI app: ``GET /`` and ``GET /ui/{file}`` (the chat page of ``chat_page``, unless ``--no-ui``),
``GET|HEAD /health``, ``GET /metrics`` (Prometheus, see ``metrics``), ``GET /version``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``,
``POST /detokenize``.

Generation endpoints answer with one JSON body, or with ``stream: true`` with server-sent events: one
``data: {chunk}`` per engine step that brought something new, then ``data: [DONE]``. Every error has OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: an invalid or unsupported field, or a prompt plus
``max_tokens`` beyond ``max_model_len``, is a 400 naming the field in ``param``; an unknown model a 404 (code
"model_not_found"); a body that is not ``application/json`` a 415; with an API key, a ``/v1/*`` request without
``Authorization: Bearer KEY`` a 401. /openapi.json documents these statuses. A client that disconnects has its
requests aborted in the engine, streaming or not.
"""
import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from flashserve import __version__
from flashserve.server.chat_page import add_chat_page
from flashserve.server.driver import EngineDriver, PromptItem, RequestStream
from flashserve.server.metrics import ServerMetrics
from flashserve.server.options import ServerOptions
from flashserve.server.tokenization import ServerTokenizer
from flashserve.server.prompts import chat_messages, chat_prompt_builder, completion_prompts
from flashserve.server.errors import InvalidRequestError, error_body
from flashserve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, check_text
from flashserve.server.responses import ChatFormat, Choice, CompletionFormat


logger = logging.getLogger(__name__)
ERROR_RESPONSES = {
    400: "invalid or unsupported field (OpenAI error body, `param` names the field)",
    401: "missing or wrong API key (only when the server runs with one)",
    404: "unknown model",
    413: "the body is larger than --max-prompt-bytes",
    415: "the body is not application/json",
    503: "too many requests waiting (--max-waiting-requests)",
}


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a text prompt, or chat ``messages`` rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def build_app(driver: EngineDriver, served_model_name: str, options: ServerOptions | None = None) -> FastAPI:
    """The app serving ``driver``'s engine under the model name ``served_model_name``, with ``options``' API key,
    CORS origins, chat template, body limit, waiting-queue bound and request log (``ServerOptions``; its host and
    port are uvicorn's business)."""
    options = options if options is not None else ServerOptions()
    api_key, max_prompt_bytes = options.api_key, options.max_prompt_bytes
    app = FastAPI(title="flashserve", description="OpenAI-compatible API of a flashserve engine",
                  version=__version__)
    metrics = driver.metrics = ServerMetrics(served_model_name)
    tokenization = ServerTokenizer(driver.engine.config, options.read_chat_template())
    app.router.on_shutdown.append(tokenization.close)
    created = int(time.time())
    max_model_len = driver.engine.max_model_len
    model_card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "flashserve",
                  "max_model_len": max_model_len}

    @app.middleware("http")
    async def check_key_and_content_type(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key", error_type="authentication_error"),
                                    status_code=401)
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_prompt_bytes:
                return JSONResponse(error_body(f"the body has {length} bytes; the server takes at most "
                                               f"{max_prompt_bytes} (--max-prompt-bytes)", code="request_too_large"),
                                    status_code=413)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return JSONResponse(error_body(f"the body must be application/json, got {content_type or 'none'!r}",
                                               code="unsupported_media_type"), status_code=415)
        return await call_next(request)

    if options.origins is not None:  # added last, so it runs first: preflight requests need no key
        app.add_middleware(CORSMiddleware, allow_origins=options.origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, error: InvalidRequestError) -> JSONResponse:
        return JSONResponse(error_body(str(error), error.param, error.code, error.error_type),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg')}"), status_code=400)
        location = [str(part) for part in first.get("loc", ())[1:]]
        param = location[0] if location else None
        if first.get("type") == "extra_forbidden":
            message = f"{'.'.join(location)} is not supported by this server"
        else:
            message = f"invalid {'.'.join(location)}: {first.get('msg')}" if location else first.get("msg")
        return JSONResponse(error_body(message, param), status_code=400)

    if options.ui:
        add_chat_page(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_api_route("/health", health, methods=["HEAD"], operation_id="health_head")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await driver.run(metrics.render), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return model_card

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            check_text(body.prompt, "prompt")
            build = lambda tokenizer: tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            build = lambda tokenizer: chat_prompt_builder(chat_messages(body.messages))(tokenizer)[0][1]
        try:
            tokens = await tokenization.run(build)
        except ValueError as error:
            raise InvalidRequestError(str(error), "messages") from None
        return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab_size = driver.engine.vocab_size
        for token in body.tokens:
            if not 0 <= token < vocab_size:
                raise InvalidRequestError(f"token id {token} is outside the vocabulary [0, {vocab_size})", "tokens")
        return {"prompt": await tokenization.run(lambda tokenizer: tokenizer.decode(body.tokens))}

    def check_model(model: str | None) -> None:
        if model is not None and model != served_model_name:
            raise InvalidRequestError(f"the model {model!r} does not exist: this server serves "
                                      f"{served_model_name!r}", "model", status_code=404, code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling_params()
        prompts = completion_prompts(body.prompt)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        fmt = CompletionFormat(response_id, int(time.time()), served_model_name, params.logprobs,
                               body.include_usage, body.echo, body.prompt_logprobs, params.n)
        stream = await _add(driver, tokenization, response_id, fmt.prompt_builder(prompts), params, "prompt",
                            "max_tokens", options)
        return await _respond(stream, fmt, body.stream, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        tools = body.tool_plan(options.tool_call_parser)
        params = body.sampling_params(tools.constraint)
        messages = chat_messages(body.messages)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        max_tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        stream = await _add(driver, tokenization, response_id, chat_prompt_builder(messages, tools.template_tools),
                            params, "messages", max_tokens_field, options)
        fmt = ChatFormat(response_id, int(time.time()), served_model_name, params.logprobs, body.include_usage,
                         params.n, tools)
        return await _respond(stream, fmt, body.stream, request)

    def openapi() -> dict:
        """The schema with the statuses the server answers (400, not FastAPI's default 422, for a bad body)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status, description in ERROR_RESPONSES.items():
                        responses[str(status)] = {"description": description}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _add(driver: EngineDriver, tokenization: ServerTokenizer, response_id: str,
               build_prompts: Callable[[object], list[PromptItem]], params, param: str,
               max_tokens_field: str, options: ServerOptions) -> RequestStream:
    """``driver.add`` of the prompts, tokenized, after checking that each prompt leaves room for ``max_tokens``
    (one token when it is None) within ``max_model_len`` — as vLLM, a 400 on ``max_tokens_field`` (on ``param`` when
    the prompt alone is too long), not a silently shortened answer; any other ValueError (a prompt the engine
    refuses) becomes an ``InvalidRequestError`` on ``param``. Prompts are built and tokenized in the tokenizer
    thread; the engine thread only queues the token ids — or answers 503 when ``options.max_waiting_requests``
    requests are already waiting."""
    max_model_len = driver.engine.max_model_len

    def tokenized(tokenizer) -> list[PromptItem]:
        items = []
        for text, token_ids in build_prompts(tokenizer):
            if token_ids is None:
                token_ids = tokenizer.encode(text)
            wanted = len(token_ids) + (params.max_tokens or 1)
            if wanted > max_model_len:
                at_fault = param if len(token_ids) + 1 > max_model_len else max_tokens_field
                raise InvalidRequestError(
                    f"this model's maximum context length is {max_model_len} tokens, but the request asks "
                    f"for {wanted} ({len(token_ids)} in the prompt, {wanted - len(token_ids)} to generate): "
                    f"shorten the prompt or lower {max_tokens_field}", at_fault)
            items.append((text, token_ids))
        return items

    def admit(engine) -> list[PromptItem]:
        limit = options.max_waiting_requests
        waiting = len(engine.scheduler.waiting) + len(engine.grammar_waitlist)
        if limit is not None and waiting + len(requests) > limit:
            raise InvalidRequestError(f"the server is overloaded: {waiting} requests are "
                                      f"waiting (--max-waiting-requests {limit}); retry later", None,
                                      status_code=503, code="server_overloaded", error_type="server_error")
        return requests

    try:
        params.check_vocabulary(driver.engine.vocab_size)
    except ValueError as error:
        raise InvalidRequestError(str(error), "logit_bias") from None
    copies = params.copies()  # n completions per prompt, prompt-major: choice i * n + j is copy j of prompt i
    try:
        items = await tokenization.run(tokenized)
        requests = [item for item in items for _ in copies]
        stream = await driver.add(response_id, admit, copies * len(items))
    except InvalidRequestError:
        raise
    except ValueError as error:
        raise InvalidRequestError(str(error), param) from None
    if options.log_requests:
        logger.info("request %s: %d prompt(s) of %s tokens, %s", response_id, len(items),
                    [len(token_ids) for _, token_ids in items], params)
    return stream


async def _respond(stream: RequestStream, fmt: CompletionFormat | ChatFormat, streaming: bool, request: Request):
    """Stream the outputs as server-sent events, or wait for them all and answer one JSON body."""
    if streaming:
        return StreamingResponse(_events(stream, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    choices = await _collect(stream, request)
    if choices is None:
        return JSONResponse(error_body("the client disconnected"), status_code=499)
    return fmt.response(choices)


async def _collect(stream: RequestStream, request: Request) -> list[Choice] | None:
    """Every output of ``stream`` folded into choices; None (requests aborted) if the client disconnects first."""
    choices = [Choice() for _ in stream.request_ids]

    async def consume() -> None:
        async for index, delta in stream:
            choices[index].add(delta)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        consumer.cancel()
        stream.abort()
    if not consumer.done() or consumer.cancelled():
        return None
    consumer.result()
    return choices


async def _events(stream: RequestStream, fmt: CompletionFormat | ChatFormat) -> AsyncIterator[str]:
    """Server-sent events: a chunk per delta, the usage chunk when asked for, ``[DONE]``; on exit (finished,
    failed, or cancelled by a disconnect) the unfinished requests are aborted."""
    choices = [Choice() for _ in stream.request_ids]
    started = [False] * len(choices)
    try:
        async for index, delta in stream:
            choices[index].add(delta)
            chunk = fmt.chunk(index, delta, choices[index], not started[index])
            started[index] = True
            if chunk is not None:
                yield _event(chunk)
        if fmt.include_usage:
            yield _event(fmt.usage_chunk(choices))
        yield "data: [DONE]\n\n"
    except RuntimeError as error:
        yield _event(error_body(str(error), error_type="server_error"))
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
