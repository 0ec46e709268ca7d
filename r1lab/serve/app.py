"""The HTTP server, `r1lab serve --model DIR`: OpenAI's chat and completions API with DeepSeek's reasoning split, and
a chat page at `/`. Routes, limits, errors and tool calls: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRouter
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from tokenizers import decoders

from r1lab.config import ServeConfig
from r1lab.engine.engine import Engine
from r1lab.engine.tools import Runner, ToolSpec, run_in_sandbox, tool_summary
from r1lab.model.templates import TemplateVariableError, render_conversation, starts_in_think
from r1lab.model.tokenizer import byte_symbols
from r1lab.serve.chat import load_engine
from r1lab.serve.batcher import Batcher, Delta, Done, Overloaded, SamplingParams
from r1lab.serve.connections import ConnectionLimits, listening_socket, raise_open_file_limit, uvicorn_config
from r1lab.serve.generation import ClientGone, Generation
from r1lab.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_json_body, parse_request
from r1lab.serve.reasoning import ReasoningSplitter, split_reasoning
from r1lab.train.checkpoint import CONFIG_FILE
from r1lab.train.task_settings import with_answer_format

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("r1lab.serve")


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: Engine
    batcher: Batcher
    model_id: str
    context_len: int
    created: int


def create_app(model_dir: str | Path, engine: Engine | None = None, runner: Runner = run_in_sandbox,
               **settings) -> FastAPI:
    """The app for a model directory; settings are ServeConfig fields; runner runs the tool calls (tests wrap it)."""
    cfg = ServeConfig(model=str(model_dir), **settings)
    cfg.check()
    return build_app(cfg, engine or load_engine(cfg), runner)


def build_app(cfg: ServeConfig, engine: Engine, runner: Runner = run_in_sandbox) -> FastAPI:
    cfg = with_answer_format(cfg, engine.tokenizer, task=None)  # what the replies' content keeps (reasoning.py)
    batcher = Batcher(engine, max_batch=cfg.max_batch, batch_wait_s=cfg.batch_wait_ms / 1000,
                      max_pending=cfg.max_pending, tools=ToolSpec.of(cfg), runner=runner)
    state = ServerState(cfg, engine, batcher,
                        cfg.served_model_name or default_served_name(cfg.model),
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


def default_served_name(model_dir: str) -> str:
    """The model directory's name; a run's final model (RUN/model beside RUN/config.yaml) is named after the run."""
    path = Path(model_dir).resolve()
    if path.name == "model" and (path.parent / CONFIG_FILE).is_file():
        return path.parent.name
    return path.name


def serve(cfg: ServeConfig) -> None:
    cfg.check()
    limits = ConnectionLimits.of(cfg, raise_open_file_limit())  # before the model loads: no room fails at once
    sock = listening_socket(cfg.host, cfg.port)  # ... and neither does a port in use
    app = build_app(cfg, load_engine(cfg))
    config = uvicorn_config(app, cfg, limits)
    print(startup_message(app.state.server) + "\n" + limits.summary(), flush=True)
    _log_like_uvicorn(cfg.log_level)
    uvicorn.Server(config).run(sockets=[sock])


def startup_message(state: ServerState) -> str:
    """What a user needs to point a client at this server: the exact base_url and model name."""
    cfg, spec = state.cfg, state.batcher.tools
    host, where = cfg.host, ""
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: this machine reaches it as localhost
        host, where = "127.0.0.1", " (listening on all interfaces: from elsewhere use this machine's address)"
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}"
    key = '"YOUR_API_KEY" (the --api-key you set)' if cfg.api_key else '"none" (any: no --api-key is set)'
    return (f"r1lab serve: model '{state.model_id}' ({state.context_len} tokens of context) on {url}{where}\n"
            f"  OpenAI clients: base_url=\"{url}/v1\", model=\"{state.model_id}\", api_key={key}\n"
            f"  chat page: {url}/" + ("" if spec is None else f"\n  tools: {tool_summary(spec)}"))


def _log_like_uvicorn(level: str) -> None:
    """The server's own lines through uvicorn's handler, at its level (call after uvicorn.Config sets it up)."""
    log.handlers = list(logging.getLogger("uvicorn.error").handlers or logging.getLogger("uvicorn").handlers)
    log.setLevel(level.upper())
    log.propagate = False


def _add_error_handlers(app: FastAPI) -> None:
    def api_error(_request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status in (408, 413):  # the body was not read to its end: the connection cannot carry another request
            headers = {"Connection": "close"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(ApiError(status, message, kind).body(), status_code=status)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, lambda _r, err: error(err.status_code, str(err.detail)))
    app.add_exception_handler(RequestValidationError, lambda _r, err: error(400, str(err.errors()[:1])))
    app.add_exception_handler(Exception, lambda _r, err: error(500, f"internal error: {type(err).__name__}"))


async def read_json(request: Request, cfg: ServeConfig) -> dict:
    """The body as a JSON object: at most max_body_bytes, received within body_timeout_s, parsed strictly."""
    try:
        body = await asyncio.wait_for(_read_body(request, cfg.max_body_bytes), cfg.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {cfg.body_timeout_s:g} s.",
                       code="request_timeout") from None
    except ClientDisconnect:  # nobody to answer: one line in the log, not a traceback
        log.info("%s went away while sending the body of %s %s", _client_id(request), request.method,
                 request.url.path)
        raise ApiError(499, "the client disconnected", code="client_disconnected") from None
    return parse_json_body(body)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def _client_id(request: Request) -> str:
    """Whom the batcher shares rows between: the remote address (a body field could be varied to pose as many)."""
    return request.client.host if request.client else "unknown"


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

    async def parse(request: Request, cls):
        req = parse_request(cls, await read_json(request, state.cfg))
        _check_model(state, req.model)
        return req

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        prompt_text = _chat_prompt(state, req)
        prompt_ids = state.engine.tokenizer.encode(prompt_text)
        gen = _start(state, req, [prompt_ids], _client_id(request))
        return await _respond(request, gen, ChatReply(state, req, len(prompt_ids), starts_in_think(prompt_text)))

    @router.post("/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        texts = req.prompts()
        if len(texts) > state.cfg.max_prompts:  # before tokenizing them all
            raise ApiError(400, f"Too many prompts: {len(texts)}. This server takes at most {state.cfg.max_prompts} "
                                "prompts in one request.", param="prompt", code="invalid_value")
        prompts = [state.engine.tokenizer.encode(p) for p in texts]
        gen = _start(state, req, prompts, _client_id(request))
        return await _respond(request, gen, CompletionReply(state, req, sum(len(p) for p in prompts)))

    return router


def _chat_prompt(state: ServerState, req: ChatRequest) -> str:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = render_conversation(state.engine.tokenizer, messages, state.cfg.template, True, req.chat_template_kwargs)
    except TemplateVariableError as err:
        raise ApiError(400, f"'chat_template_kwargs': {err}.", param="chat_template_kwargs",
                       code="invalid_value") from None
    return text + state.cfg.prefill


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "r1lab",
            "max_model_len": state.context_len}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_id:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{state.model_id}`.",
                       param="model", code="model_not_found")


def _start(state: ServerState, req, prompts: list[list[int]], client: str) -> Generation:
    params = _sampling_params(state, req, [len(p) for p in prompts])
    try:
        return Generation(state.batcher, prompts, params, stream=req.stream, client=client)
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
    rows = len(prompt_lens) * req.n
    max_tokens = asked if asked is not None else min(cfg.max_tokens, ctx - longest, cfg.max_request_tokens // rows)
    # fairness protects latency, not the machine's time: one request queues at most max_request_tokens
    budget = rows * max(max_tokens, 1)
    if budget > cfg.max_request_tokens:
        raise ApiError(400, f"This request asks for {budget} completion tokens ({len(prompt_lens)} prompts x n={req.n} "
                            f"x max_tokens={max(max_tokens, 1)}); this server allows at most {cfg.max_request_tokens} "
                            "in one request.", param="max_tokens", code="request_too_large")
    if max_tokens < 1 or longest + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{longest + max(max_tokens, 1)} tokens ({longest} in the prompt, {max(max_tokens, 1)} in "
                            "the completion). Please reduce the prompt or the completion length.",
                       param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, n=req.n, temperature=req.temperature, top_p=req.top_p,
                          **req.sampling_extras(), seed=req.seed, stop=req.stop_strings(),
                          logprobs=isinstance(req, ChatRequest) and bool(req.logprobs))


async def _respond(request: Request, gen: Generation, reply: _Reply):
    if reply.req.stream:
        return StreamingResponse(reply.stream(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        done = await gen.results(request.is_disconnected)
    except ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it; the rows were freed
    return JSONResponse(reply.body(done))


def _data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Reply:
    id_prefix = ""

    def __init__(self, state: ServerState, req, prompt_tokens: int):
        self.model, self.req, self.prompt_tokens = state.model_id, req, prompt_tokens
        self.id, self.created = f"{self.id_prefix}{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(self, object_name: str, choices: list[dict], completion_tokens: int | None = None) -> dict:
        out = {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}
        if completion_tokens is not None:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": self.prompt_tokens + completion_tokens}
        return out

    async def stream(self, gen: Generation):
        """SSE events: the choices' chunks, an optional usage chunk, then [DONE]; an error mid-way is an event."""
        completion_tokens = 0
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        usage = {"usage": None} if include_usage else {}  # as OpenAI's: null in every chunk until the last one
        try:
            for first in self.opening_chunks():
                yield _data({**first, **usage})
            async for event in gen.events():
                for chunk in self.chunks(event):
                    yield _data({**chunk, **usage})
                if isinstance(event, Done):
                    completion_tokens += event.completion_tokens
        except ApiError as err:
            yield _data(err.body())
        else:
            if include_usage:
                yield _data(self.envelope(self.chunk_object, [], completion_tokens))
        yield "data: [DONE]\n\n"

    def opening_chunks(self) -> list[dict]:
        return []

    def body(self, done: list[Done]) -> dict:
        return self.envelope(self.body_object, [self.choice(d) for d in done], sum(d.completion_tokens for d in done))


class ChatReply(_Reply):
    """chat.completion and chat.completion.chunk bodies, the text split into reasoning_content and content."""

    id_prefix, body_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, state: ServerState, req: ChatRequest, prompt_tokens: int, in_think: bool):
        super().__init__(state, req, prompt_tokens)
        self.in_think, self.answer_format = in_think, state.cfg.answer_format
        self.splitters = [ReasoningSplitter(in_think, self.answer_format) for _ in range(req.n)]
        self.tokenizer = state.engine.tokenizer
        self.pending: list[list] = [[] for _ in range(req.n)]  # per choice: log-probs no chunk has carried yet
        self.seen = [0] * req.n  # how many arrived through Deltas; a Done repeats them all

    def choice(self, d: Done) -> dict:
        reasoning, content = split_reasoning(d.text, self.in_think, self.answer_format)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        logprobs = self._logprobs(d.logprobs or []) if self.req.logprobs else None
        return {"index": d.index, "message": message, "logprobs": logprobs, "finish_reason": d.finish_reason}

    def opening_chunks(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def chunks(self, event) -> list[dict]:
        i, splitter = event.index, self.splitters[event.index]
        reasoning, content = splitter.feed(event.text) if isinstance(event, Delta) else splitter.finish()
        new = (event.logprobs or [])[self.seen[i] if isinstance(event, Done) else 0:]
        self.seen[i] += len(new)
        self.pending[i] += new
        out = []
        if reasoning or content:  # the log-probs of tokens whose text is held back ride on a later chunk
            out.append(self._chunk(i, {"content": content or None, "reasoning_content": reasoning or None},
                                   logprobs=self._take(i)))
        if isinstance(event, Done):
            out.append(self._chunk(i, {}, event.finish_reason, self._take(i)))
        return out

    def _take(self, i: int) -> list:
        out, self.pending[i] = self.pending[i], []
        return out

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        body = self._logprobs(logprobs) if logprobs else None
        return self.envelope(self.chunk_object, [{"index": index, "delta": delta, "logprobs": body,
                                                  "finish_reason": finish_reason}])

    def _logprobs(self, tokens: list) -> dict:
        """OpenAI's choice.logprobs: one entry per completion token, reasoning and end-of-text included."""
        raw = [(token_bytes(self.tokenizer, t), lp) for t, lp in tokens]
        return {"content": [{"token": b.decode("utf-8", "backslashreplace"), "logprob": lp, "bytes": list(b),
                             "top_logprobs": []} for b, lp in raw], "refusal": None}


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's exact bytes: a byte-level BPE token may hold part of a UTF-8 character (decoded alone: U+FFFD)."""
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        piece = tokenizer.backend.id_to_token(token)
        byte_of = _byte_of_symbol()
        if piece and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
    return tokenizer.backend.decode([token], skip_special_tokens=False).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_of_symbol() -> dict[str, int]:
    return {c: b for b, c in byte_symbols().items()}


class CompletionReply(_Reply):
    """text_completion bodies: the raw completion text, think and answer tags included."""

    id_prefix = "cmpl-"
    body_object = chunk_object = "text_completion"

    def choice(self, d: Done) -> dict:
        return {"index": d.index, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}

    def chunks(self, event) -> list[dict]:
        text = event.text if isinstance(event, Delta) else ""
        reason = event.finish_reason if isinstance(event, Done) else None
        return [self.envelope(self.chunk_object, [{"index": event.index, "text": text, "logprobs": None,
                                                   "finish_reason": reason}])]
