"""``EngineDriver``: one background thread owns the ``LLMEngine``; asyncio code talks to it through queues.

The engine is not thread-safe, so every call into it (add, abort, step, and anything passed to ``run``) happens in
the driver's thread. That thread drains a command queue, runs one ``step()`` while requests are unfinished (and
sleeps on the queue when none are), and hands each step's outputs to the asyncio event loop of the coroutine that
added the request, where they are detokenized (``flashserve.server.detokenization``: the engine runs the requests
with ``detokenize=False``) and land in that request group's ``asyncio.Queue``.
"""
import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable

import torch

from flashserve.engine.llm_engine import LLMEngine
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.server.detokenization import RequestDetokenizer, ServerDetokenizer

PromptItem = tuple[str | None, list[int] | None]
"""One prompt for ``LLMEngine.add_request``: (text or None, token ids or None; the ids win when both are given)."""


class RequestStream:
    """The outputs of a group of engine requests added together (one per prompt), as an async iterator.

    Iterating yields ``(index, RequestOutput)`` pairs: ``index`` is the prompt's position in the group and the
    output carries only what is new since that request's previous output (``LLMEngine.step`` semantics, text
    included: each output is detokenized when it arrives, outside the engine thread). Iteration
    ends once every request of the group has finished. ``abort()`` drops the requests that have not finished; call it
    whenever the consumer stops early (a disconnected client), or their KV blocks stay in use until they end.
    """

    def __init__(self, driver: "EngineDriver", request_ids: list[str], loop: asyncio.AbstractEventLoop,
                 detokenizers: list[RequestDetokenizer]):
        self.request_ids = request_ids
        self._driver = driver
        self._loop = loop
        self._detokenizers = detokenizers
        self._queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = len(request_ids)

    @property
    def finished(self) -> bool:
        """Whether every request of the group has delivered its last output."""
        return self._unfinished == 0

    def abort(self) -> None:
        """Drop the group's unfinished requests in the engine (non-blocking; safe to call more than once)."""
        if not self.finished:
            self._driver._abort(self.request_ids)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished = 0
            raise item
        if item[1].finished:
            self._unfinished -= 1
        return item

    def _deliver(self, items: list) -> None:
        """Event-loop side: detokenize and enqueue ``(index, output)`` pairs, or enqueue an exception (called
        through the loop). A request finished here by a stop string is aborted in the engine; what the engine
        still sends for it is dropped."""
        metrics = self._driver.metrics
        for item in items:
            if not isinstance(item, BaseException):
                index, output = item
                detokenizer = self._detokenizers[index]
                if detokenizer.finished:
                    continue
                try:
                    output, stopped_here = detokenizer.process(output)
                except Exception as error:  # a client must not wait forever for an output that cannot come
                    self.abort()
                    item = RuntimeError(f"detokenization failed: {error!r}")
                else:
                    if stopped_here:
                        self._driver._abort([self.request_ids[index]])
                    if metrics is not None:
                        metrics.on_outputs([output])
                    item = (index, output)
            self._queue.put_nowait(item)


class EngineDriver:
    """Runs ``engine`` in a daemon thread until ``close()``.

    Args:
        engine: the engine to drive; from now on only the driver's thread may call it (``run``/``submit`` reach
            it there; reading constants such as ``engine.max_model_len`` from elsewhere is fine).
        detokenizer: what turns the outputs into text in the event loops (None: one with its own tokenizer).

    Attributes:
        metrics: a ``ServerMetrics`` told of every request added and aborted (in the engine thread) and of every
            output once detokenized (in its event loop); None: no metrics.
    """

    def __init__(self, engine: LLMEngine, detokenizer: ServerDetokenizer | None = None):
        self.engine = engine
        self.detokenizer = detokenizer or ServerDetokenizer(engine.config)
        self.metrics = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, tuple[RequestStream, int]] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="flashserve-engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` in the engine thread (between steps); the future holds its result or exception."""
        future = concurrent.futures.Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(self.engine))
            except BaseException as error:  # handed to the caller, who decides what it means
                future.set_exception(error)

        self._put(command)
        return future

    async def run(self, fn: Callable[[LLMEngine], object]):
        """``submit`` from asyncio: await ``fn(engine)``'s result (its exception is raised here)."""
        return await asyncio.wrap_future(self.submit(fn))

    async def add(self, request_id: str, build_prompts: Callable[[LLMEngine], list[PromptItem]],
                  params: SamplingParams | list[SamplingParams]) -> RequestStream:
        """Add one engine request per prompt, all or none, and return their ``RequestStream``.

        Args:
            request_id: the group's id; request ``i`` is ``f"{request_id}-{i}"`` in the engine.
            build_prompts: called in the engine thread (it may use ``engine.tokenizer``) to give the prompts.
            params: the sampling parameters of every request of the group, or a list of one per prompt.

        Raises ValueError (nothing is added) when ``build_prompts`` or ``LLMEngine.add_request`` does; a message
        about prompt ``i`` of several starts with ``prompt[i]:``.
        """
        loop = asyncio.get_running_loop()

        def add_all(engine: LLMEngine) -> RequestStream:
            prompts = build_prompts(engine)
            ids = [f"{request_id}-{index}" for index in range(len(prompts))]
            params_list = params if isinstance(params, list) else [params] * len(prompts)
            detokenizers = []
            for index, (engine_id, (text, token_ids)) in enumerate(zip(ids, prompts)):
                try:
                    if token_ids is None:
                        token_ids = engine.tokenizer.encode(text)
                    detokenizers.append(self.detokenizer.start(token_ids, params_list[index]))
                    engine.add_request(engine_id, text, detokenizers[-1].engine_params, prompt_token_ids=token_ids)
                except Exception as error:
                    engine.abort_request(ids[:index])
                    if not isinstance(error, ValueError):
                        raise
                    raise ValueError(f"prompt[{index}]: {error}" if len(prompts) > 1 else str(error)) from None
            stream = RequestStream(self, ids, loop, detokenizers)
            for index, engine_id in enumerate(ids):
                self._routes[engine_id] = (stream, index)
            if self.metrics is not None:
                self.metrics.on_added(ids)
            return stream

        return await self.run(add_all)

    def _abort(self, request_ids: list[str]) -> None:
        """Queue the abort of ``request_ids`` (ignored once the driver is closed: the engine is gone then)."""
        def abort(engine: LLMEngine) -> None:
            engine.abort_request(request_ids)
            self._forget(request_ids)

        try:
            self.submit(abort)
        except RuntimeError:
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread after the commands already queued; requests still running end with an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(None)
        self._thread.join(timeout_s)

    def _put(self, command: Callable[[], None]) -> None:
        """Queue a command for the engine thread; RuntimeError once ``close`` has begun."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine driver is closed")
            self._commands.put(command)

    def _loop(self) -> None:
        """The engine thread: run queued commands, then one step while requests are unfinished."""
        device = self.engine.config.torch_device
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the current device is per thread: make it the engine's here too
        while True:
            commands = [] if self.engine.has_unfinished() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is None:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                command()
            if self.engine.has_unfinished():
                self._step()

    def _step(self) -> None:
        """One engine step; each stream gets its outputs in one hand-over to its event loop."""
        try:
            outputs = self.engine.step()
        except Exception as error:  # a failing step must not leave clients waiting forever
            self._fail_all(RuntimeError(f"the engine failed: {error!r}"))
            return
        batches: dict[RequestStream, list] = {}
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            stream, index = route
            batches.setdefault(stream, []).append((index, output))
            if output.finished:
                del self._routes[output.request_id]
        for stream, items in batches.items():
            self._send(stream, items)

    def _fail_all(self, error: Exception) -> None:
        """Abort every routed request and raise ``error`` in each waiting stream."""
        streams = {stream for stream, _ in self._routes.values()}
        self.engine.abort_request(list(self._routes))
        self._forget(list(self._routes))
        for stream in streams:
            self._send(stream, [error])

    def _send(self, stream: RequestStream, items: list) -> None:
        """Hand ``items`` to the stream's event loop; a closed loop means nobody listens: abort its requests."""
        try:
            stream._loop.call_soon_threadsafe(stream._deliver, items)
        except RuntimeError:
            self.engine.abort_request(stream.request_ids)
            self._forget(stream.request_ids)

    def _forget(self, request_ids: list[str]) -> None:
        """Engine thread: drop the routes of aborted requests (and count the unfinished ones as aborted)."""
        for request_id in request_ids:
            self._routes.pop(request_id, None)
        if self.metrics is not None:
            self.metrics.on_aborted(request_ids)
