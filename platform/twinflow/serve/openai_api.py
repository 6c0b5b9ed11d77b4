"""OpenAI-compatible Images API on the same deployment: `POST /v1/images/generations` (JSON) and
`POST /v1/images/edits` (multipart/form-data), so OpenAI clients, SDKs and gateways work unchanged.

The routes are translations: the body becomes our own request (`GenerateRequest` or `EditFields`,
plus the size and response_format checks ours does not have), which takes the replica's one path
(`TwinFlow._admit`: Host, cross-site, Content-Type and token, body bounds, model lookup and
multiplexing, limits, the upload decode; then the batcher and seeded noise, so a request with `seed`
gives the same images as `/v1/generate` with that seed); the result becomes that API's answer. Our
extras ride along as extra body fields (`nfe`, `seed`, `guidance`; the openai client's `extra_body`).
Answers use that API's shapes: `{"created", "data": [{"b64_json"}], ...}` and errors as
`{"error": {"message", "type", "param", "code"}}`; invalid values are 400 there (our own routes say 422).

Routes live in the `OpenAIImages` mixin of the `TwinFlow` deployment class, on `router`, which the app
includes; Serve's class ingress binds them to the replica. No `from __future__ import annotations`
(FastAPI must resolve `request: Request` on the rebuilt routes).
"""

import base64
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from twinflow.serve.images import form_values
from twinflow.serve.schemas import (
    FORM,
    IMAGE_PART,
    JSON,
    MAX_SEED,
    ApiError,
    EditFields,
    GenerateRequest,
    ModelId,
    Parsed,
    Text,
    json_safe,
    request_body,
    validated,
)

router = APIRouter()

# our field -> the OpenAI parameter a client sent it as
_PARAM = {"num_images": "n", "instruction": "prompt"}
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


class ImagesRequest(BaseModel):
    """The OpenAI Images parameters we take, plus our extras. Unsupported OpenAI parameters are
    refused by name rather than ignored (except `user`, which only identifies the caller)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text = Field(description="caption (generations) or instruction (edits)")
    model: ModelId | None = Field(
        None, description="a model id of GET /v1/models; default: the default model"
    )
    n: int = Field(1, description="images from this seed (at most the deployment's max_images)")
    size: str | None = Field(None, description='"auto" or "<S>x<S>", the model\'s own side (GET /v1/models)')
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json only")
    output_format: Literal["png"] | None = None
    user: str | None = Field(None, description="accepted and ignored")
    nfe: int = Field(1, description="extra: function evaluations")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="extra: same seed, same images")
    guidance: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="extra: CFG weight w")

    def check_model(self, info) -> None:
        """`size` and `response_format` against the model: parameters our own request does not have."""
        _check_size(self.size, info)
        _check_format(self)


def _param(loc: list[Any]) -> str | None:
    name = next((str(p) for p in loc if p not in ("body",)), None)
    return _PARAM.get(name, name) if name else None


def openai_error(exc: ApiError) -> JSONResponse:
    """Our ApiError in the OpenAI error shape; schema and limit errors (422) become 400."""
    status = 400 if exc.status == 422 else exc.status
    param = None
    message = exc.message
    if isinstance(exc.details, list) and exc.details and isinstance(exc.details[0], dict):
        first = exc.details[0]
        param = _param(first.get("loc") or [])
        message = f"{exc.message}: {param}: {first.get('msg', '')}" if param else exc.message
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = {"unauthorized": "invalid_api_key", "unknown_model": "model_not_found"}.get(exc.type, exc.type)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(json_safe(body), status_code=status, headers=exc.headers)


def _check_size(size: str | None, info) -> None:
    own = f"{info.image_size}x{info.image_size}"
    if size not in (None, "auto", own):
        raise ApiError(
            400,
            "unsupported_size",
            f"size {size!r}: model {info.id!r} makes {own} images; use size {own!r} or 'auto'",
            [{"loc": ["size"], "msg": f"must be {own!r} or 'auto'"}],
        )


def _check_format(req: ImagesRequest) -> None:
    if req.response_format == "url":
        raise ApiError(
            400,
            "unsupported_response_format",
            "response_format 'url' is not offered: this server stores no images; use 'b64_json'",
            [{"loc": ["response_format"], "msg": "only 'b64_json' is supported"}],
        )


def _ours(req: ImagesRequest, kind) -> Any:
    """The same request in our own schema, which the replica's request path takes."""
    text = {"prompt": req.prompt} if kind is GenerateRequest else {"instruction": req.prompt}
    return kind.model_construct(
        model=req.model,
        nfe=req.nfe,
        seed=req.seed,
        num_images=req.n,
        guidance=req.guidance,
        format="base64-json",
        **text,
    )


_EDIT_FORM = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": dict(IMAGE_PART),
        **{k: v for k, v in ImagesRequest.model_json_schema()["properties"].items() if k != "output_format"},
    },
}


class OpenAIImages:
    """Mixin of the `TwinFlow` deployment: uses its `_admit`, `_submit`, `_answered`, `_body` and `_form`."""

    @router.post(
        "/v1/images/generations", openapi_extra=request_body({JSON: ImagesRequest.model_json_schema()})
    )
    async def images_generations(self, request: Request) -> Response:
        return await self._images(request, JSON, self._read_generations)

    @router.post("/v1/images/edits", openapi_extra=request_body({FORM: _EDIT_FORM}))
    async def images_edits(self, request: Request) -> Response:
        return await self._images(request, FORM, self._read_edits)

    async def _read_generations(self, request: Request) -> Parsed:
        req = await self._body(request, ImagesRequest)
        return Parsed(_ours(req, GenerateRequest), check=req.check_model)

    async def _read_edits(self, request: Request) -> Parsed:
        fields, files = await self._form(request)  # the capped streaming parser, off the event loop
        images = [k for k in files if k in ("image", "image[]")]
        problems = [
            {"loc": [k], "msg": "not supported: only the image is a file part"}
            for k in files
            if k not in images
        ]
        if len(images) != 1:
            problems.append({"loc": ["image"], "msg": "exactly one image file part is required"})
        n = fields.pop("n", None)
        data, bad = form_values(fields)
        problems += bad
        if n is not None:
            try:
                data["n"] = int(n)
            except ValueError:
                problems.append({"loc": ["n"], "msg": "must be a whole number", "input": n})
        if problems:
            raise ApiError(422, "invalid_request", "request does not match the schema", problems)
        req = validated(ImagesRequest, data)
        return Parsed(_ours(req, EditFields), files[images[0]], req.check_model)

    async def _images(self, request: Request, media: str, read) -> Response:
        """The replica's one request path, answered in that API's shapes."""
        try:
            job = await self._admit(request, (media,), read)
            seed, result = await self._submit(job)
        except ApiError as exc:
            return openai_error(exc)
        size = job.info.image_size
        body = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode()} for p in result.pngs],
            "output_format": "png",
            "size": f"{size}x{size}",
        }
        headers = {
            "X-TwinFlow-Model": job.info.id,
            "X-TwinFlow-Seed": str(seed),
            "X-TwinFlow-NFE": str(job.req.nfe),
        }
        return self._answered(result, JSONResponse(body, headers=headers))
