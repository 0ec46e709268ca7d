"""The HTTP server: `r1lab serve --model DIR`. OpenAI's chat and completions API, DeepSeek's reasoning split, a chat
page at `/`.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming over SSE or not), GET /v1/models, GET /health,
GET / (the chat page). Every request shares one engine through the batcher (r1lab/serve/batcher.py). Each bad
request gets a 4xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; nothing a client
sends should crash the server or leave a connection hanging.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRouter
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from r1lab.config import ServeConfig
from r1lab.engine import Engine
from r1lab.serve.batcher import Batcher, Delta, Done, Overloaded, SamplingParams
from r1lab.serve.generation import ClientGone, Generation
from r1lab.serve.prompts import render_messages, starts_in_think
from r1lab.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_request
from r1lab.serve.reasoning import ReasoningSplitter, split_reasoning

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: Engine
    batcher: Batcher
    model_id: str
    context_len: int
    created: int


def load_engine(cfg: ServeConfig) -> Engine:
    from r1lab.grpo import load_policy, pick_device

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_policy(cfg.model, pick_device(cfg.device), cfg.dtype)
    return Engine(model.eval(), tokenizer)


def create_app(model_dir: str | Path, engine: Engine | None = None, **settings) -> FastAPI:
    """The app for a model directory; settings are ServeConfig fields (api_key=..., max_batch=...)."""
    cfg = ServeConfig(model=str(model_dir), **settings)
    cfg.check()
    return build_app(cfg, engine or load_engine(cfg))


def build_app(cfg: ServeConfig, engine: Engine) -> FastAPI:
    state = ServerState(cfg, engine, Batcher(engine, max_batch=cfg.max_batch, batch_wait_s=cfg.batch_wait_ms / 1000,
                                             max_pending=cfg.max_pending),
                        cfg.served_model_name or Path(cfg.model).resolve().name,
                        cfg.max_model_len or engine.model.config.max_position_embeddings, int(time.time()))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        state.batcher.close()

    app = FastAPI(title="r1lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _add_error_handlers(app)
    app.include_router(_api_routes(state))
    app.get("/health")(lambda: {"status": "ok", "model": state.model_id, "pending": state.batcher.pending,
                                "batcher": dict(state.batcher.stats)})
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC_DIR / "index.html"))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg.check()
    app = build_app(cfg, load_engine(cfg))
    state: ServerState = app.state.server
    print(f"r1lab serve: model '{state.model_id}' ({state.context_len} tokens of context) on "
          f"http://{cfg.host}:{cfg.port}  (chat page: /, API: /v1)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)


# ---------------------------------------------------------------------------------------------------------------
# errors


def _add_error_handlers(app: FastAPI) -> None:
    def api_error(_request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def http_error(_request, err: HTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code)

    def validation_error(_request, err: RequestValidationError):
        return JSONResponse(ApiError(400, str(err.errors()[:1])).body(), status_code=400)

    def server_error(_request, err: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", "server_error").body(), status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes before reading them when the length is given."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


# ---------------------------------------------------------------------------------------------------------------
# the API


def _api_routes(state: ServerState) -> APIRouter:
    def require_key(request: Request) -> None:
        if not state.cfg.api_key:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer YOUR_KEY'.",
                           code="missing_api_key")
        if not hmac.compare_digest(header.encode(), f"Bearer {state.cfg.api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @router.get("/models")
    def models():
        return {"object": "list", "data": [_model_card(state)]}

    @router.get("/models/{model_id:path}")
    def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(ChatRequest, await read_json(request, state.cfg.max_body_bytes))
        _check_model(state, req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt_text = render_messages(state.engine.tokenizer, messages, state.cfg.template, state.cfg.prefill)
        prompt_ids = state.engine.tokenizer.encode(prompt_text)
        gen = _start(state, req, [prompt_ids])
        reply = ChatReply(state, req, len(prompt_ids), starts_in_think(prompt_text))
        if req.stream:
            return _sse(reply.stream(gen))
        return await _answer(request, gen, reply.body)

    @router.post("/completions")
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await read_json(request, state.cfg.max_body_bytes))
        _check_model(state, req.model)
        prompts = [state.engine.tokenizer.encode(p) for p in req.prompts()]
        gen = _start(state, req, prompts)
        reply = CompletionReply(state, req, sum(len(p) for p in prompts))
        if req.stream:
            return _sse(reply.stream(gen))
        return await _answer(request, gen, reply.body)

    return router


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "r1lab",
            "max_model_len": state.context_len}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_id:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{state.model_id}`.",
                       param="model", code="model_not_found")


def _start(state: ServerState, req, prompts: list[list[int]]) -> Generation:
    """Check the request against the limits and queue its completions."""
    params = _sampling_params(state, req, [len(p) for p in prompts])
    try:
        return Generation(state.batcher, prompts, params, stream=req.stream)
    except Overloaded as err:
        raise ApiError(503, f"server overloaded: {err}; retry later", "server_error", code="overloaded") from None


def _sampling_params(state: ServerState, req, prompt_lens: list[int]) -> SamplingParams:
    cfg, ctx = state.cfg, state.context_len
    if min(prompt_lens) == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if req.n > cfg.max_batch:
        raise ApiError(400, f"n is too large: {req.n}; this server generates at most {cfg.max_batch} at once",
                       param="n", code="invalid_value")
    asked, longest = req.requested_max_tokens(), max(prompt_lens)
    if asked is not None and asked > cfg.max_tokens:
        raise ApiError(400, f"max_tokens is too large: {asked}. This server allows at most {cfg.max_tokens} "
                            "completion tokens.", param="max_tokens", code="invalid_value")
    max_tokens = asked if asked is not None else min(cfg.max_tokens, ctx - longest)
    if max_tokens < 1 or longest + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{longest + max(max_tokens, 1)} tokens ({longest} in the prompt, {max(max_tokens, 1)} in "
                            "the completion). Please reduce the prompt or the completion length.",
                       param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, n=req.n, temperature=req.temperature, top_p=req.top_p,
                          seed=req.seed, stop=req.stop_strings())


async def _answer(request: Request, gen: Generation, body) -> JSONResponse:
    """Wait for every completion (cancelling them if the client leaves first) and build the response."""
    try:
        done = await gen.results(request.is_disconnected)
    except ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it; the rows were freed
    return JSONResponse(body(done))


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------------------------
# response bodies


class _Reply:
    object_name = ""
    id_prefix = ""

    def __init__(self, state: ServerState, req, prompt_tokens: int):
        self.model, self.req, self.prompt_tokens = state.model_id, req, prompt_tokens
        self.id, self.created = f"{self.id_prefix}{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(self, object_name: str, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def stream(self, gen: Generation):
        """SSE events: the choices' chunks, an optional usage chunk, then [DONE]; an error mid-way is sent as an
        error event (the status line has already gone out)."""
        completion_tokens = 0
        try:
            for first in self.opening_chunks():
                yield _data(first)
            async for event in gen.events():
                for chunk in self.chunks(event):
                    yield _data(chunk)
                if isinstance(event, Done):
                    completion_tokens += event.completion_tokens
        except ApiError as err:
            yield _data(err.body())
            yield "data: [DONE]\n\n"
            return
        options = self.req.stream_options
        if options is not None and options.include_usage:
            yield _data(self.envelope(self.chunk_object, [], _usage(self.prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"

    def opening_chunks(self) -> list[dict]:
        return []


class ChatReply(_Reply):
    """chat.completion and chat.completion.chunk bodies, the text split into reasoning_content and content."""

    id_prefix, chunk_object = "chatcmpl-", "chat.completion.chunk"

    def __init__(self, state: ServerState, req: ChatRequest, prompt_tokens: int, in_think: bool):
        super().__init__(state, req, prompt_tokens)
        self.in_think = in_think
        self.splitters = [ReasoningSplitter(in_think) for _ in range(req.n)]

    def body(self, done: list[Done]) -> dict:
        choices = []
        for d in done:
            reasoning, content = split_reasoning(d.text, self.in_think)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
            choices.append({"index": d.index, "message": message, "logprobs": None, "finish_reason": d.finish_reason})
        return self.envelope("chat.completion", choices,
                             _usage(self.prompt_tokens, sum(d.completion_tokens for d in done)))

    def opening_chunks(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def chunks(self, event) -> list[dict]:
        splitter = self.splitters[event.index]
        reasoning, content = splitter.feed(event.text) if isinstance(event, Delta) else splitter.finish()
        out = [self._chunk(event.index, {"content": content or None, "reasoning_content": reasoning or None})] \
            if reasoning or content else []
        if isinstance(event, Done):
            out.append(self._chunk(event.index, {}, event.finish_reason))
        return out

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return self.envelope(self.chunk_object, [{"index": index, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}])


class CompletionReply(_Reply):
    """text_completion bodies: the raw completion text, think and answer tags included."""

    id_prefix, chunk_object = "cmpl-", "text_completion"

    def body(self, done: list[Done]) -> dict:
        choices = [{"index": d.index, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason} for d in done]
        return self.envelope("text_completion", choices,
                             _usage(self.prompt_tokens, sum(d.completion_tokens for d in done)))

    def chunks(self, event) -> list[dict]:
        text = event.text if isinstance(event, Delta) else ""
        reason = event.finish_reason if isinstance(event, Done) else None
        return [self.envelope("text_completion", [{"index": event.index, "text": text, "logprobs": None,
                                                   "finish_reason": reason}])]
