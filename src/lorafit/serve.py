"""`lorafit serve`: a run directory behind HTTP (FastAPI + uvicorn) with dynamic batching.

Concurrent requests put their texts on one bounded asyncio queue; a single worker task takes up to
`max_batch_size` texts (waiting at most `max_wait_ms` for more), sorts them by length, runs them in forwards of
`batch_size` texts (8 on a CPU) in a worker thread (the event loop stays free) and resolves each request's future.
Endpoints: POST /v1/classify, POST /predict (the shape of text-embeddings-inference), GET /v1/model, /healthz,
/readyz, /metrics (Prometheus), / (a page for people) and /docs (OpenAPI). Every 4xx body is JSON
`{"error": "...", "field": ...}`; see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the endpoints' annotations in this module's globals
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ServeConfig
from .errors import describe

log = logging.getLogger("lorafit.serve")

PAGE = "serve_page.html"
UNPROTECTED = {"/healthz", "/readyz", "/"}  # health probes, and the static page, which holds no data and asks for the key


# --- request bodies (validated by hand from raw bytes, so every bad body gets one clear JSON error) -----------
class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"texts": ["Oil prices climb as OPEC cuts output", "Federer wins the final"], "top_k": 2}]})

    texts: list[str] = Field(..., min_length=1, description="Texts to classify.")
    top_k: Optional[int] = Field(None, ge=1, description="Only the k most probable classes per text (default: all).")


class PredictRequest(BaseModel):
    """text-embeddings-inference's /predict body; its other fields (truncate, ...) are accepted and ignored."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": "Oil prices climb as OPEC cuts output"}]})

    inputs: Union[str, list[Union[str, list[str]]]] = Field(
        ..., description='A text, a list of texts, or TEI\'s batch form [["t1"], ["t2"]].')
    raw_scores: bool = Field(False, description="Logits instead of probabilities.")


class ApiError(Exception):
    """An answer other than 200: status, one-line message, the offending field (dotted path) if any."""

    def __init__(self, status: int, error: str, field: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


def _field_path(loc) -> Optional[str]:
    """pydantic's ('texts', 2) -> 'texts[2]'; union branch names (e.g. 'str', 'list[str]') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[union[str,list[str]]]") or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or None


async def read_body(request, model: type[BaseModel], max_bytes: int) -> BaseModel:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"request body is {int(length)} bytes; the limit is {max_bytes}")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    if not raw.strip():
        raise ApiError(400, "empty request body; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ApiError(422, f"the body must be a JSON object, not {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _field_path(first["loc"])
        raise ApiError(422, f"{field or 'body'}: {first['msg']}", field) from None


def check_texts(texts: list[str], field: str, opts: ServeConfig) -> None:
    if len(texts) > opts.max_texts:
        raise ApiError(413, f"{field}: {len(texts)} texts; at most {opts.max_texts} per request (split the list)", field)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(422, f"{field}[{i}]: empty text; every text needs some content", f"{field}[{i}]")
        if len(text) > opts.max_chars:
            raise ApiError(422, f"{field}[{i}]: {len(text)} characters; at most {opts.max_chars} per text",
                           f"{field}[{i}]")


# --- metrics ----------------------------------------------------------------------------------------------------
class Metrics:
    """prometheus_client (small, no dependencies) rather than the text format by hand: it gets histograms, label
    escaping and the exposition format right. A registry per app: no global state."""

    def __init__(self, queue_depth, texts_per_second):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lorafit_requests", "HTTP requests by path and status.", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("lorafit_request_duration_seconds", "Request latency.", ["path"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("lorafit_batch_size", "Texts per gathered batch.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batches = Counter("lorafit_batches", "Batches gathered and run by the batcher (each in forwards of "
                               "forward_batch_size texts).", registry=self.registry)
        self.texts = Counter("lorafit_texts", "Texts classified.", registry=self.registry)
        Gauge("lorafit_queue_depth", "Texts waiting for a forward pass.", registry=self.registry).set_function(queue_depth)
        Gauge("lorafit_texts_per_second", "Texts classified per second over the last 10 s.",
              registry=self.registry).set_function(texts_per_second)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- dynamic batching -----------------------------------------------------------------------------------------
class _Job:
    """One request's texts; its future resolves to the logits, rows in request order, once every text is done."""

    def __init__(self, texts: list[str], loop):
        self.texts, self.future = texts, loop.create_future()
        self.logits: list[Optional[np.ndarray]] = [None] * len(texts)
        self.left = len(texts)

    def done_one(self, index: int, row: np.ndarray) -> None:
        self.logits[index] = row
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(np.stack(self.logits))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class QueueFull(Exception):
    pass


class Batcher:
    """One queue of (job, text index); one worker task gathers batches; one thread runs them, one at a time."""

    def __init__(self, predict_logits, max_batch_size: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self.predict_logits = predict_logits  # texts -> logits (n, classes)
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.waiting = 0  # texts submitted and not yet in a forward (the queue, plus the batch being gathered)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-forward")
        self.recent: collections.deque = collections.deque()  # (time, texts) of recent forwards, for texts/s
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            job, _ = self.queue.get_nowait()
            job.fail(ApiError(503, "server is shutting down; retry on another instance"))
        self.executor.shutdown(wait=True)

    def depth(self) -> int:
        return self.waiting

    def texts_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / window

    async def submit(self, texts: list[str]) -> np.ndarray:
        if self.waiting + len(texts) > self.max_queue:
            raise QueueFull()
        job = _Job(texts, asyncio.get_running_loop())
        self.waiting += len(texts)
        for i in range(len(texts)):  # no await in between: the whole request is queued or none of it
            self.queue.put_nowait((job, i))
        return await job.future

    async def _take_batch(self) -> list:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take_batch()
            self.waiting -= len(batch)
            batch = [(job, i) for job, i in batch if not job.future.done()]  # a disconnected client's texts are skipped
            if not batch:
                continue
            # one call per gathered batch: the classifier sorts the texts by token length (data.sorted_batches) and
            # runs them in forwards of forward_batch_size texts, so padding stays small
            texts = [job.texts[i] for job, i in batch]
            try:
                logits = await loop.run_in_executor(self.executor, self.predict_logits, texts)
            except Exception as exc:  # a failed forward fails its requests (500), never the worker
                log.exception("forward pass failed")
                for job, _ in batch:
                    job.fail(exc)
                continue
            self.metrics.batches.inc()
            self.metrics.batch_size.observe(len(texts))
            self.metrics.texts.inc(len(texts))
            self.recent.append((time.monotonic(), len(texts)))
            for (job, i), row in zip(batch, logits):
                job.done_one(i, row)


class AuthAndMetrics:
    """The API key check and the request metrics, as a plain ASGI middleware: `@app.middleware("http")` (Starlette's
    BaseHTTPMiddleware) adds a task and memory streams to every request, a cost the server pays on every text."""

    def __init__(self, app, api_key: Optional[str], metrics: Metrics, unauthorized, route_paths):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.unauthorized, self.route_paths = unauthorized, route_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        start, path, status = time.perf_counter(), scope["path"], [500]

        async def send_and_see_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in UNPROTECTED and not _has_key(Headers(scope=scope), self.api_key):
                await self.unauthorized()(scope, receive, send_and_see_status)
            else:
                await self.app(scope, receive, send_and_see_status)
        finally:  # an exception here becomes Starlette's 500, counted as one
            # the route, not the raw path: bounded label values (a 401 is answered before routing, hence the set)
            label = path if path in self.route_paths() else "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


# --- the app --------------------------------------------------------------------------------------------------
def run_summary(run_dir: Path) -> dict[str, Any]:
    """What /v1/model and the page show: labels, backbone, method, the TF-IDF blend's weight (0: the encoder alone)
    and the run's scalar test metrics."""
    from .rundir import read_labels, read_run, read_test_metrics, read_tfidf_weight

    run_dir, cfg, _ = read_run(run_dir)
    test = read_test_metrics(run_dir)
    return {"run": run_dir.name, "labels": read_labels(run_dir), "backbone": cfg.model.model,
            "method": cfg.model.method, "pooling": cfg.model.pooling, "max_length": cfg.data.max_length,
            "tfidf_weight": read_tfidf_weight(run_dir, cfg),
            "test_metrics": {k: v for k, v in test.items() if isinstance(v, (int, float))}}


def create_app(run_dir: str | Path, options: Optional[ServeConfig] = None, classifier=None):
    """The FastAPI app serving `run_dir`. The model loads and warms up in a thread after start-up (/healthz answers
    at once, /readyz once it is ready); `classifier` (a lorafit.Classifier) skips the loading."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .evaluate import softmax
    from .predict import resolve_backend
    from .runtime import resolve_device

    opts = options or ServeConfig()
    run_dir = Path(run_dir)
    summary = run_summary(run_dir)
    device = resolve_device(opts.device, field="device")
    backend_name, _ = resolve_backend(run_dir, opts.backend, device)  # fails here, before listening, if not exported
    # small forwards pad least on a CPU (docs/serving.md); a GPU takes the gathered batch in one forward
    forward_batch_size = (opts.batch_size if opts.batch_size != "auto"
                          else 8 if device == "cpu" else opts.max_batch_size)
    labels = summary["labels"]
    max_bytes = opts.max_texts * (opts.max_chars * 4 + 16) + 65_536  # UTF-8 is at most 4 bytes a character
    state: dict[str, Any] = {"classifier": classifier, "ready": False, "error": None}

    def load_and_warm() -> None:
        if state["classifier"] is None:
            from .predict import load

            state["classifier"] = load(run_dir, device=device, backend=opts.backend, batch_size=forward_batch_size,
                                       precision=opts.precision, allow_different_base=opts.allow_different_base)
        clf = state["classifier"]
        clf.batch_size = forward_batch_size
        clf.decision_function(["warm up", "a longer text to warm up the model with a second, padded row"])

    metrics = Metrics(lambda: batcher.depth(), lambda: batcher.texts_per_second())
    batcher = Batcher(lambda texts: state["classifier"].decision_function(texts), opts.max_batch_size,
                      opts.max_wait_ms, opts.max_queue, metrics)

    async def get_ready() -> None:
        try:
            await asyncio.to_thread(load_and_warm)
        except Exception as exc:  # stays unready and says why on /readyz
            state["error"] = describe(exc)
            log.error("model failed to load: %s", state["error"])
            return
        batcher.start()
        state["ready"] = True
        log.info("model ready: %s, %s backend, %d labels", summary["run"], state["classifier"].backend.name, len(labels))

    @asynccontextmanager
    async def lifespan(app):
        loading = asyncio.get_running_loop().create_task(get_ready())
        yield
        loading.cancel()
        await batcher.stop()

    app = FastAPI(title="lorafit serve", version=_version(), lifespan=lifespan,
                  description=f"Text classification with the lorafit run `{summary['run']}` ({', '.join(labels)}).")

    def error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None):
        return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.error, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0]
        field = _field_path(first["loc"][1:] if first["loc"][:1] in (("body",), ("query",)) else first["loc"])
        return error(422, f"{field or 'request'}: {first['msg']}", field)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):  # logged by Starlette with its traceback; the body stays one line
        return error(500, "internal error; see the server log")

    unauthorized = lambda: error(401, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",  # noqa: E731
                                 headers={"WWW-Authenticate": "Bearer"})
    app.add_middleware(AuthAndMetrics, api_key=opts.api_key, metrics=metrics, unauthorized=unauthorized,
                       route_paths=lambda: route_paths)

    async def classify_texts(texts: list[str]) -> np.ndarray:
        if not state["ready"]:
            raise ApiError(503, "model is still loading; retry shortly" if state["error"] is None else
                           f"model failed to load: {state['error']}", headers={"Retry-After": "1"})
        try:
            return await batcher.submit(texts)
        except QueueFull:
            raise ApiError(503, f"server busy: more than {opts.max_queue} texts queued; retry shortly",
                           headers={"Retry-After": "1"}) from None

    body_schema = lambda model: {"requestBody": {"required": True, "content": {  # noqa: E731
        "application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/classify", openapi_extra=body_schema(ClassifyRequest),
              summary="Labels and class probabilities for a list of texts")
    async def classify(request: Request) -> dict:
        body = await read_body(request, ClassifyRequest, max_bytes)
        check_texts(body.texts, "texts", opts)
        probs = softmax(await classify_texts(body.texts))
        k = min(body.top_k or len(labels), len(labels))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            results.append({"label": labels[int(order[0])], "score": float(row[order[0]]),
                            "probabilities": {labels[int(j)]: float(row[j]) for j in order}})
        return {"results": results, "backend": state["classifier"].backend.name}

    @app.post("/predict", openapi_extra=body_schema(PredictRequest),
              summary="text-embeddings-inference's /predict: [{label, score}] per text, most probable first")
    async def predict(request: Request):
        body = await read_body(request, PredictRequest, max_bytes)
        single = isinstance(body.inputs, str)
        texts = []
        for i, item in enumerate([body.inputs] if single else body.inputs):
            if isinstance(item, list):  # TEI's batch form: each sequence is [text] (or a pair, for cross-encoders)
                if len(item) != 1:
                    raise ApiError(422, f"inputs[{i}]: text pairs are not supported; send one text per item",
                                   f"inputs[{i}]")
                item = item[0]
            texts.append(item)
        if not texts:
            raise ApiError(422, "inputs: the list is empty; send at least one text", "inputs")
        check_texts(texts, "inputs", opts)
        logits = await classify_texts(texts)
        scores = logits if body.raw_scores else softmax(logits)
        out = [[{"label": labels[int(j)], "score": float(row[j])} for j in np.argsort(-row, kind="stable")]
               for row in scores]
        return out[0] if single else out

    @app.get("/v1/model", summary="The run being served: labels, backbone, method, test metrics, backend, limits")
    async def model_info() -> dict:
        clf = state["classifier"]
        return {**summary, "backend": clf.backend.name if clf is not None else backend_name, "ready": state["ready"],
                "limits": {"forward_batch_size": forward_batch_size,
                           **opts.model_dump(include={"max_batch_size", "max_wait_ms", "max_queue", "max_texts",
                                                      "max_chars"})}}

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up (503 until then)")
    async def readyz():
        if state["ready"]:
            return {"status": "ready", "backend": state["classifier"].backend.name}
        message = "loading" if state["error"] is None else f"model failed to load: {state['error']}"
        return error(503, message, headers={"Retry-After": "1"})

    @app.get("/metrics", summary="Prometheus text format", response_class=Response)
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    page = resources.files("lorafit").joinpath("resources", PAGE).read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    route_paths = {route.path for route in app.routes}
    app.state.batcher = batcher
    app.state.device, app.state.backend_name = device, backend_name  # what `lorafit serve` says it serves with
    return app


def _has_key(headers, key: str) -> bool:
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return secrets.compare_digest(given.encode(), key.encode())  # constant time: no key guessing by timing


def _version() -> str:
    from . import __version__

    return __version__


def check_host(host: str, api_key: Optional[str]) -> Optional[str]:
    """A warning when the server would be reachable from other machines without a key."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return None
    return None if api_key else (f"listening on {host} without --api-key: anyone who can reach this machine can "
                                 "use the model")


__all__ = ["Batcher", "ServeConfig", "create_app"]
