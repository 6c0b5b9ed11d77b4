"""The Serve application: `import_path: twinflow.serve.app:build_app` with the args of `ServeAppConfig`.

One deployment, `TwinFlow`, is both the FastAPI ingress and the model holder:

- every generating route, ours and the OpenAI-style ones (twinflow.serve.openai_api), takes one path:
  `_admit` (Host, cross-site, Content-Type and token; the body as our own request; model; limits; an
  edit's upload decoded on the upload threads), then `_submit` (the batcher). A route only reads its
  body into our request and shapes the answer;
- `@serve.multiplexed` loads checkpoints by id (LRU per replica). The id comes from the body's `model`;
  a client that also sends the `serve_multiplexed_model_id` header gets routed by Serve to a replica
  that already holds that model;
- the replica's `Batcher` (twinflow.serve.batcher) turns concurrent requests into compute turns of up
  to `max_batch_images` images (the engine groups them by model, NFE, guidance and task). Torch runs on
  one worker thread, so the replica keeps taking requests for the next turn meanwhile. It is used instead of
  `@serve.batch`, whose fixed window costs a lone request 2 ms and splits load into small batches;
- `PhaseTotals` (twinflow.serve.phases) sums where request time goes, shown in `/v1/stats`.

Why one deployment and not an API deployment in front of a model deployment: the handle hop between
them costs about 9 ms of CPU per request on a 2-core machine (measured, docs/serving.md), more than the
whole per-request overhead budget at 1 NFE.

Replicas, autoscaling and CPUs come from the Serve config's `deployments:` section.

No `from __future__ import annotations` here: Serve's class ingress rebuilds the route functions, and
FastAPI could then no longer resolve string annotations (a `request: Request` became a query field).
"""

import asyncio
import base64
import logging
import os
import secrets
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from twinflow.export_reader import read_export_metadata
from twinflow.method.config import sample_guidance_of
from twinflow.serve.batcher import Batcher
from twinflow.serve.body import BodyReaders, parse_json
from twinflow.serve.config import DEPLOYMENT, ServeAppConfig, parse_args
from twinflow.serve.engine import (
    EDIT_TASK,
    Item,
    Result,
    TextEncoders,
    image_to_model,
    load_served_model,
    run_items,
    tasks_of,
)
from twinflow.serve.exposure import (
    SecurityHeaders,
    check_exposure,
    cross_site,
    default_allowed_hosts,
    host_allowed,
    media_type,
    normalise_token,
    page_headers,
    script_string,
    tokens_match,
)
from twinflow.serve.images import ImageBounds, base64_bytes, form_values, open_image
from twinflow.serve.metrics import RequestMetrics, label_request, record_turn
from twinflow.serve.openai_api import OpenAIImages
from twinflow.serve.openai_api import router as openai_router
from twinflow.serve.phases import PhaseTotals
from twinflow.serve.schemas import (
    API_VERSION,
    FORM,
    IMAGE_PART,
    JSON,
    Admitted,
    ApiError,
    BatchInfo,
    EditFields,
    EditRequest,
    GenerateRequest,
    GenerateResponse,
    ImageOut,
    ModelInfo,
    ModelsResponse,
    Parsed,
    Timings,
    check_limits,
    request_body,
    validated,
    validation_details,
)
from twinflow.serve.uploads import FormLimits, FormTooLarge, StreamingForm

PLAYGROUND = "playground.html"
log = logging.getLogger("ray.serve")


# ------------------------------------------------------------------------------------ model replicas
def _edit_form_schema() -> dict[str, Any]:
    schema = EditFields.model_json_schema()
    schema["properties"]["image"] = dict(IMAGE_PART)
    schema["required"] = sorted({*schema.get("required", []), "image"})
    return schema


# --------------------------------------------------------------------------------------- API ingress
api = FastAPI(title="TwinFlow", version=API_VERSION, docs_url="/docs", redoc_url=None)
api.include_router(openai_router)  # /v1/images/*: routes of the OpenAIImages mixin
api.add_middleware(RequestMetrics)
api.add_middleware(SecurityHeaders)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Whatever slipped through still answers with the JSON error model, never plain text."""
    return JSONResponse(
        {"error": {"type": "internal_error", "message": f"{type(exc).__name__} while handling the request"}},
        status_code=500,
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "type": "invalid_request",
                "message": "request does not match the schema",
                "details": validation_details(exc),
            }
        },
        status_code=422,
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class TwinFlow(OpenAIImages):
    """HTTP API v1, the playground, and the checkpoints (multiplexed by id) with batched sampling."""

    def __init__(self, config: dict[str, Any], infos: list[dict[str, Any]], token: str | None) -> None:
        import torch

        self.cfg = parse_args(config)
        self.infos = {i["id"]: ModelInfo.model_validate(i) for i in infos}
        env = self.cfg.auth_token_env
        self.token = normalise_token(token or (os.environ.get(env) if env else None))
        if self.cfg.auth == "none":
            self.token = None
        elif self.cfg.auth == "token" and not self.token:
            raise RuntimeError(
                f"auth: token, but {env or 'auth_token_env'} is unset or empty in this replica"
            )
        # build_application resolved the default from the bind address; None here: a direct caller
        self.allowed_hosts = self.cfg.allowed_hosts or default_allowed_hosts("127.0.0.1")
        self.limits = self.cfg.limits
        self.form_limits = FormLimits(
            max_parts=self.limits.max_form_parts,
            max_field_bytes=self.limits.max_form_field_bytes,
            max_file_bytes=self.limits.max_image_bytes,
        )
        # multipart parsing, base64 and image decoding run here, never on the event loop
        self.uploads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="twinflow-upload")
        self.max_batch = self.cfg.batching.max_batch_images
        self.readers = BodyReaders(
            self.limits.max_body_readers, self.limits.body_timeout_s, self.limits.max_body_bytes
        )
        from PIL import Image

        # Image.open raised DecompressionBombError (a 400) on a 20000x20000 header before the side check
        # (413) ran; serve.images.open_image bounds sides and pixels from the header instead.
        Image.MAX_IMAGE_PIXELS = None
        self._page: str | None = None
        # model side
        torch.set_num_threads(self.cfg.threads)
        # The torch thread holds the GIL through Python-heavy forwards; a short switch interval lets the
        # event loop take in requests meanwhile, so they are there to batch when the forward ends.
        sys.setswitchinterval(self.cfg.switch_interval_ms / 1e3)
        self.sources = {m.id: m.path for m in self.cfg.models}
        self.encoders = TextEncoders(self.cfg.text_cache_size)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinflow-torch")
        self.max_rows = max(self.max_batch, self.limits.max_images)
        self.batcher = Batcher(self._turn, self.max_batch, self.cfg.batching.batch_wait_timeout_s)
        self.batch_sizes: dict[int, int] = {}  # requests per model batch -> count
        self.phases = PhaseTotals()
        self.loads: list[str] = []

    # ---------------------------------------------------------------- model side
    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str):
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None:  # the LRU size is a decorator argument; apply the config's
            wrapper.max_num_models_per_replica = self.cfg.max_models_per_replica
        self.loads.append(model_id)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool,
            lambda: load_served_model(
                model_id,
                self.sources[model_id],
                cache_dir=self.cfg.cache_dir,
                max_rows=self.max_rows,
                row_stable=self.cfg.batching.row_stable,
            ),
        )

    async def _turn(self, take: list) -> None:
        """One compute turn of the batcher (twinflow.serve.batcher)."""
        now = time.perf_counter()
        for it, _ in take:
            self.phases.add("queue_wait", (now - it.queued_at) * 1e3)
        await self._compute(take)

    async def _compute(self, take: list) -> None:
        """Sample one turn's requests together; when that fails, each runs alone, so a bad request
        fails by itself instead of taking its batch mates down with it."""
        try:
            await self._sample(take)
        except Exception as exc:
            if len(take) == 1:
                if not take[0][1].done():
                    take[0][1].set_exception(exc)
            else:
                for one in take:
                    await self._compute([one])
                return
        self.batch_sizes[len(take)] = self.batch_sizes.get(len(take), 0) + 1

    async def _sample(self, take: list) -> None:
        t0 = time.perf_counter()
        batch = [it for it, _ in take]
        models = {mid: await self.get_model(mid) for mid in dict.fromkeys(it.model_id for it in batch)}
        phases: dict[str, float] = {}
        results = await asyncio.get_running_loop().run_in_executor(
            self.pool, run_items, models, self.encoders, batch, phases
        )
        ready = time.perf_counter()
        record_turn(batch, phases, t0)
        for name, ms in phases.items():
            self.phases.add(name, ms)
        self.phases.add("handoff", (ready - t0) * 1e3 - sum(phases.values()))
        self.phases.turns += 1
        for (_, f), r in zip(take, results):
            r.ready_at = ready
            if not f.done():
                f.set_result(r)

    # ---------------------------------------------------------------- helpers
    def _guard(self, request: Request, *media: str) -> None:
        """Host, cross-site, Content-Type (when `media` names the accepted ones), then the token."""
        authority = request.headers.get("host")
        if not host_allowed(authority, self.allowed_hosts):
            raise ApiError(
                400, "host_not_allowed", f"Host {authority!r} is not one this service answers (allowed_hosts)"
            )
        if cross_site(request.headers, authority) and not host_allowed(
            request.headers.get("origin", "").partition("://")[2], [h for h in self.allowed_hosts if h != "*"]
        ):
            raise ApiError(403, "cross_site", "cross-site requests are refused (Origin / Sec-Fetch-Site)")
        if media and media_type(request.headers.get("content-type")) not in media:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be {' or '.join(media)}, not {request.headers.get('content-type')!r}",
            )
        self._auth(request)

    def _auth(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not tokens_match(value, self.token):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request, schema):
        raw = await self.readers.read(request.stream(), request.headers.get("content-length"))
        return validated(schema, parse_json(raw, self.limits.max_json_depth))

    async def _read_generate(self, request: Request) -> Parsed:
        return Parsed(await self._body(request, GenerateRequest))

    async def _read_edit(self, request: Request) -> Parsed:
        """The edit request and its image bytes, from JSON (base64 image) or multipart/form-data."""
        ctype = request.headers.get("content-type", "")
        loop = asyncio.get_running_loop()
        if media_type(ctype) == JSON:
            req = await self._body(request, EditRequest)
            try:
                raw = await loop.run_in_executor(
                    self.uploads, base64_bytes, req.image, self.limits.max_image_bytes
                )
                return Parsed(req, raw)
            except OverflowError as exc:
                raise ApiError(413, "image_too_large", str(exc)) from None
            except ValueError as exc:
                raise ApiError(400, "bad_image", str(exc)) from None
        fields, files = await self._form(request)
        data, problems = form_values(fields)
        problems += [{"loc": [k], "msg": "only the image is a file part"} for k in files if k != "image"]
        if "image" not in files:
            problems.append({"loc": ["image"], "msg": "a file part named 'image' is required"})
        if problems:
            raise ApiError(422, "invalid_request", "request does not match the schema", problems)
        return Parsed(validated(EditFields, data), files["image"])

    async def _form(self, request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
        """A multipart/form-data body, parsed on the upload threads as it streams in, under the form
        caps: (text fields, file fields), or ApiError 413 / 400."""
        loop = asyncio.get_running_loop()
        refused: list[ValueError] = []

        async def feed(chunk: bytes) -> None:
            # after a refusal the rest of the body is read (within the reader's size and time bounds)
            # but not parsed, so the client gets the 4xx instead of a reset connection
            if not refused:
                try:
                    await loop.run_in_executor(self.uploads, form.feed, chunk)
                except ValueError as exc:  # FormTooLarge included
                    refused.append(exc)

        try:
            form = StreamingForm(request.headers.get("content-type", ""), self.form_limits)
            await self.readers.read(request.stream(), request.headers.get("content-length"), sink=feed)
            if refused:
                raise refused[0]
            return form.result()
        except FormTooLarge as exc:
            raise ApiError(413, "form_too_large", f"multipart/form-data body refused: {exc}") from None
        except ValueError as exc:
            raise ApiError(
                400, "malformed_form", f"request body is not valid multipart/form-data: {exc}"
            ) from None

    def _edit_image(self, info: ModelInfo, raw: bytes):
        """Checks, decodes and resizes the upload: called on the upload threads."""
        bounds = ImageBounds(
            self.limits.max_image_bytes, self.limits.max_image_side, self.limits.max_image_pixels
        )
        try:
            img = open_image(raw, bounds)  # format, bytes and header pixels checked before decoding
        except OverflowError as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "bad_image", str(exc)) from None
        if EDIT_TASK not in info.tasks:
            raise ApiError(
                501,
                "not_implemented",
                f"model {info.id!r} does not support editing (its tasks: {info.tasks})",
            )
        return image_to_model(img, info.channels, info.image_size)

    def _model(self, model_id: str | None) -> ModelInfo:
        header = serve.get_multiplexed_model_id()
        if model_id and header and model_id != header:
            raise ApiError(
                400,
                "model_mismatch",
                f"body names model {model_id!r}, the serve_multiplexed_model_id header {header!r}",
            )
        mid = model_id or header or self.cfg.default_id
        info = self.infos.get(mid)
        if info is None:
            raise ApiError(404, "unknown_model", f"unknown model id {mid!r}", {"models": sorted(self.infos)})
        return info

    async def _admit(self, request: Request, media: tuple[str, ...], read) -> Admitted:
        """What every generating route does before queueing, native or OpenAI-style: Host, cross-site,
        Content-Type (`media`) and token; the body, read by `read` into our own request (`Parsed`); the
        model, the route's own checks, the limits; an edit's image, decoded on the upload threads."""
        t0 = time.perf_counter()
        with self.batcher.arriving_request():
            self._guard(request, *media)
            parsed: Parsed = await read(request)
            req = parsed.req
            info = self._model(req.model)
            label_request(info.id, req.nfe)
            if parsed.check is not None:
                parsed.check(info)
            check_limits(req, req.text, self.limits, info.guidance)
            image = None
            if req.task == EDIT_TASK:
                image = await asyncio.get_running_loop().run_in_executor(
                    self.uploads, self._edit_image, info, parsed.upload
                )
        return Admitted(t0, info, req, image)

    async def _submit(self, job: Admitted) -> tuple[int, Result]:
        """Queue an admitted request for a compute turn: (its seed, its result)."""
        req, info = job.req, job.info
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        item = Item(
            info.id,
            req.text,
            req.nfe,
            seed,
            req.num_images,
            req.guidance,
            job.image,
            weight=min(req.num_images, self.max_batch),
            queued_at=time.perf_counter(),
        )
        self.phases.add("parse", (item.queued_at - job.t0) * 1e3)
        try:
            result: Result = await self.batcher.submit(item)
        except Exception as exc:  # loading or sampling failed: answer 500 and stay up
            # the text can hold paths, endpoints or bucket names: it goes to the replica's log only
            ref = uuid.uuid4().hex[:12]
            log.error("model_error %s (model %s): %r", ref, info.id, exc)
            raise ApiError(
                500,
                "model_error",
                f"{type(exc).__name__} while generating (error id {ref} in the replica's log)",
            ) from None
        return seed, result

    async def _answer(self, job: Admitted) -> Response:
        """Our own routes' answer: the PNG itself, or GenerateResponse's JSON."""
        req, info = job.req, job.info
        seed, result = await self._submit(job)
        total = _ms(job.t0)
        if req.format == "png":
            headers = {
                "X-TwinFlow-Model": info.id,
                "X-TwinFlow-Seed": str(seed),
                "X-TwinFlow-NFE": str(req.nfe),
                "X-TwinFlow-Batch-Requests": str(result.batch_requests),
                "X-TwinFlow-Total-Ms": str(total),
                "X-TwinFlow-Model-Ms": str(round(result.model_ms, 3)),
            }
            return self._answered(result, Response(result.pngs[0], media_type="image/png", headers=headers))
        out = GenerateResponse(
            id=uuid.uuid4().hex,
            model=info.id,
            task=req.task,
            nfe=req.nfe,
            seed=seed,
            num_images=req.num_images,
            guidance=info.guidance if req.guidance is None else float(req.guidance),
            images=[ImageOut(index=i, data=base64.b64encode(p).decode()) for i, p in enumerate(result.pngs)],
            timings=Timings(total_ms=total, model_ms=round(result.model_ms, 3)),
            batch=BatchInfo(
                requests=result.batch_requests,
                images=result.batch_images,
                group_requests=result.group_requests,
            ),
        )
        return self._answered(result, Response(out.model_dump_json(), media_type="application/json"))

    def _answered(self, result: Result, response: Response) -> Response:
        self.phases.add("response", (time.perf_counter() - result.ready_at) * 1e3)
        self.phases.requests += 1
        return response

    # ---------------------------------------------------------------- routes
    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        openapi_extra=request_body({JSON: GenerateRequest.model_json_schema()}),
    )
    async def generate(self, request: Request) -> Response:
        return await self._answer(await self._admit(request, (JSON,), self._read_generate))

    @api.post(
        "/v1/edit",
        response_model=GenerateResponse,
        openapi_extra=request_body({JSON: EditRequest.model_json_schema(), FORM: _edit_form_schema()}),
    )
    async def edit(self, request: Request) -> Response:
        return await self._answer(await self._admit(request, (JSON, FORM), self._read_edit))

    @api.get("/v1/models", response_model=ModelsResponse)
    async def list_models(self, request: Request) -> ModelsResponse:
        self._guard(request)
        paths = self.cfg.show_model_paths
        models = [m if paths else m.model_copy(update={"source": None}) for m in self.infos.values()]
        return ModelsResponse(models=models, limits=self.limits.model_dump())

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Counters of the replica that answers (batch calls by size, text-embedding cache, loads)."""
        self._guard(request)
        return {
            "batches": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "text_cache": self.encoders.cache_info(),
            "model_loads": list(self.loads),
            "max_batch_images": self.max_batch,
            "phases": self.phases.snapshot(),
        }

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "api_version": API_VERSION, "models": sorted(self.infos)})

    @api.get("/", response_class=HTMLResponse)
    async def playground(self, request: Request) -> HTMLResponse:
        authority = request.headers.get("host")
        if not host_allowed(authority, self.allowed_hosts):
            raise ApiError(
                400, "host_not_allowed", f"Host {authority!r} is not one this service answers (allowed_hosts)"
            )
        if not self.cfg.playground:
            raise ApiError(404, "not_found", "the playground is turned off (playground: false)")
        if self._page is None:
            self._page = resources.files("twinflow.serve").joinpath(PLAYGROUND).read_text()
        base = request.scope.get("root_path", "").rstrip("/")
        nonce = secrets.token_urlsafe(16)
        page = self._page.replace('"__TWINFLOW_BASE__"', script_string(base))
        page = page.replace("__TWINFLOW_AUTH__", "true" if self.token else "false")
        page = page.replace("__TWINFLOW_NONCE__", nonce)
        return HTMLResponse(page, headers=page_headers(nonce))


# ------------------------------------------------------------------------------------------- builder
def model_info(entry, meta: dict[str, Any], cfg: ServeAppConfig) -> dict[str, Any]:
    shape = [int(v) for v in meta["sample_shape"]]
    return ModelInfo(
        id=entry.id,
        default=entry.id == cfg.default_id,
        method=meta.get("method"),
        guidance=sample_guidance_of(meta.get("method_config")),
        job=meta.get("job"),
        steps=meta.get("steps"),
        family=meta["family"],
        sample_shape=shape,
        image_size=int(meta["image_size"]),
        channels=int(meta["pixel_channels"]),
        latent=bool(meta.get("latent")),
        lora=bool(meta.get("lora")),
        tasks=tasks_of(meta),
        nfe={
            "min": cfg.limits.min_nfe,
            "max": cfg.limits.max_nfe,
            "default": max(cfg.limits.min_nfe, 1 if meta.get("method") != "flow_matching" else 4),
        },
        text_max_length=int(meta["text_encoder"]["max_length"]),
        description=entry.description,
        source=entry.path,
    ).model_dump()


def describe(cfg: ServeAppConfig) -> list[dict[str, Any]]:
    """Every model's /v1/models entry, from its twinflow.json (fails fast on a wrong path)."""
    return [model_info(m, read_export_metadata(m.path), cfg) for m in cfg.models]


def serve_bind_host() -> str:
    """The address Serve's HTTP proxies bind: the running controller's, else the default that
    `serve.run` starts them with."""
    import ray
    from ray.serve.config import HTTPOptions
    from ray.serve.context import _get_global_client

    client = None
    if ray.is_initialized():
        try:
            client = _get_global_client(raise_if_no_controller_running=False)
        except Exception:  # no controller: serve.run starts one with the defaults
            client = None
    return (client.http_config if client is not None else HTTPOptions()).host or "127.0.0.1"


def build_app(args: dict[str, Any]):
    """The application builder for Serve configs (`import_path: twinflow.serve.app:build_app`; Serve
    requires exactly one parameter). Relative model paths resolve against the builder's cwd (where
    `serve run` was started)."""
    return build_application(args)


def build_application(
    args: dict[str, Any] | None = None, deployment_options: dict[str, dict[str, Any]] | None = None
):
    """`build_app` for callers outside a Serve config (`twinflow serve`, tests, benchmarks):
    `deployment_options` ({deployment name: .options() kwargs}) does what a config's `deployments:` does."""
    cfg = parse_args(args).resolved()
    infos = describe(cfg)
    token = normalise_token(os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None)
    host = serve_bind_host()
    check_exposure(host, cfg.auth, token, "serve app")
    over = [i["id"] for i in infos if i["guidance"] > cfg.limits.max_guidance]
    if over:
        raise ValueError(
            f"models {over}: their default guidance is over limits.max_guidance {cfg.limits.max_guidance}"
        )
    if cfg.allowed_hosts is None:
        cfg = cfg.model_copy(update={"allowed_hosts": default_allowed_hosts(host)})
    config = cfg.model_dump(mode="json")
    opts = dict(deployment_options or {})
    unknown = sorted(set(opts) - {DEPLOYMENT})
    if unknown:
        raise ValueError(
            f"deployment options for unknown deployments {unknown}; the deployment is {DEPLOYMENT}"
        )
    dep = TwinFlow.options(**opts[DEPLOYMENT]) if opts.get(DEPLOYMENT) else TwinFlow
    return dep.bind(config, infos, token or None)
