"""The FastAPI app: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

Generation endpoints answer with one JSON body, or with ``stream: true`` with server-sent events: one
``data: {chunk}`` per engine step that brought something new, then ``data: [DONE]``. Invalid requests get an HTTP
400 with OpenAI's error body naming the field in ``param`` (an unknown model name: 404, code "model_not_found").
A client that disconnects has its requests aborted in the engine, streaming or not.
"""
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.engine.llm_engine import LLMEngine
from flashserve.server.driver import EngineDriver, PromptItem, RequestStream
from flashserve.server.prompts import chat_messages, chat_prompt_builder, completion_prompts
from flashserve.server.protocol import (ChatCompletionRequest, CompletionRequest, InvalidRequestError,
                                        error_body)
from flashserve.server.responses import ChatFormat, Choice, CompletionFormat


def build_app(driver: EngineDriver, served_model_name: str) -> FastAPI:
    """The app serving ``driver``'s engine under the model name ``served_model_name``."""
    app = FastAPI(title="flashserve", description="OpenAI-compatible API of a flashserve engine")
    created = int(time.time())
    max_model_len = driver.engine.max_model_len

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, error: InvalidRequestError) -> JSONResponse:
        return JSONResponse(error_body(str(error), error.param, error.code), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg')}"), status_code=400)
        location = [str(part) for part in first.get("loc", ())[1:]]
        param = location[0] if location else None
        message = f"invalid {'.'.join(location)}: {first.get('msg')}" if location else first.get("msg")
        return JSONResponse(error_body(message, param), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "flashserve", "max_model_len": max_model_len}]}

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
        stream = await _add(driver, response_id, lambda engine: prompts, params, "prompt")
        fmt = CompletionFormat(response_id, int(time.time()), served_model_name, params.logprobs,
                               body.include_usage)
        return await _respond(stream, fmt, body.stream, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling_params()
        messages = chat_messages(body.messages)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await _add(driver, response_id, chat_prompt_builder(messages), params, "messages")
        fmt = ChatFormat(response_id, int(time.time()), served_model_name, params.logprobs, body.include_usage)
        return await _respond(stream, fmt, body.stream, request)

    return app


async def _add(driver: EngineDriver, response_id: str, build_prompts: Callable[[LLMEngine], list[PromptItem]],
               params, param: str) -> RequestStream:
    """``driver.add``; a ValueError (a prompt the engine refuses) becomes an ``InvalidRequestError`` on ``param``."""
    try:
        return await driver.add(response_id, build_prompts, params)
    except ValueError as error:
        raise InvalidRequestError(str(error), param) from None


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
