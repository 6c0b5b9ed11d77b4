"""JSON API v1: request and response schemas, and the errors the API answers with.

Requests are strict (`extra="forbid"`, no type coercion): an unknown field or a string where a
number belongs is a 422 with the offending location. Bounds that depend on the deployment's config
(NFE range, images per request, prompt length) are checked by `check_limits` after parsing, with
the same error shape. Every error body is `{"error": {"type", "message", "details"}}`, and it is
always encodable: numbers must be finite and text valid Unicode (a lone surrogate or 1e309 once
reached the encoder and came back as a plain-text 500).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from twinflow.serve.config import Limits

API_VERSION = "v1"
MAX_SEED = 2**63 - 1
JSON = "application/json"
FORM = "multipart/form-data"
IMAGE_PART = {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"}


def request_body(schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A route's `openapi_extra` ({media type: schema}): the routes read their bodies themselves, so
    FastAPI cannot derive the request body for the docs."""
    return {"requestBody": {"content": {m: {"schema": s} for m, s in schemas.items()}, "required": True}}


class ApiError(Exception):
    """An error answered as JSON with `status`; `type` is a stable machine-readable code."""

    def __init__(
        self, status: int, type: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.details = status, type, message, details
        self.headers = headers

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return json_safe({"error": err})


def json_safe(value: Any) -> Any:
    """A copy that strict JSON can encode: non-finite floats and undecodable strings become repr text."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _unicode(text: str) -> str:
    """Reject text that is not valid Unicode (JSON's \\ud800 escapes can carry lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at position {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
ModelId = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task: ClassVar[str]  # what the request asks for: generate or edit
    text_field: ClassVar[str]  # the field that holds its text

    @property
    def text(self) -> str:
        return getattr(self, self.text_field)

    model: ModelId | None = Field(
        None, description='model id (GET /v1/models); omit it (not "") for the default'
    )
    nfe: int = Field(1, description="function evaluations: 1, 2, 4, ... (the any-step knob)")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="same seed and inputs give the same image; default: random (returned)",
    )
    num_images: int = Field(1, description="images from this seed (one noise draw of shape (n, C, H, W))")
    guidance: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="CFG weight w; default: the model's own (GET /v1/models: 0 for TwinFlow, whose CFG "
        "is baked in by training; a flow-matching base's recommended sample_guidance)",
    )
    format: Literal["png", "base64-json"] = Field(
        "base64-json",
        description="png: the image itself (num_images must be 1); base64-json: JSON with base64 PNGs",
    )


class GenerateRequest(_Request):
    prompt: Text = Field(description="caption, e.g. 'a photo of a sneaker'")

    task: ClassVar[str] = "generate"
    text_field: ClassVar[str] = "prompt"


class EditFields(_Request):
    """`/v1/edit` as multipart/form-data: these fields, plus the image as a file part named `image`."""

    instruction: Text = Field(description="what to change, e.g. 'flip the sneaker horizontally'")

    task: ClassVar[str] = "edit"
    text_field: ClassVar[str] = "instruction"


class EditRequest(EditFields):
    image: Text = Field(description="the image to edit: base64 PNG/JPEG/WebP, optionally as a data: URL")


class ImageOut(BaseModel):
    index: int
    mime_type: str = "image/png"
    data: str = Field(description="base64 PNG")


class Timings(BaseModel):
    total_ms: float = Field(description="request received to response built, inside the API replica")
    model_ms: float = Field(description="the batch's model work (text encoding, sampling, PNG encoding)")


class BatchInfo(BaseModel):
    requests: int = Field(description="requests served by the same compute turn")
    images: int = Field(description="images in that call")
    group_requests: int = Field(description="requests sampled together (same model, NFE, guidance, task)")


class GenerateResponse(BaseModel):
    id: str
    model: str
    task: Literal["generate", "edit"]
    nfe: int
    seed: int
    num_images: int
    guidance: float
    images: list[ImageOut]
    timings: Timings
    batch: BatchInfo


class ModelInfo(BaseModel):
    id: str
    default: bool
    method: str | None
    guidance: float = Field(0.0, description="CFG w used when a request names none")
    job: str | None
    steps: int | None
    family: str
    sample_shape: list[int]
    image_size: int
    channels: int
    latent: bool
    lora: bool
    tasks: list[str]
    nfe: dict[str, int] = Field(description="{min, max, default}")
    text_max_length: int
    description: str = ""
    source: str | None = Field(None, description="the export's path: only with show_model_paths")


class ModelsResponse(BaseModel):
    api_version: str = API_VERSION
    models: list[ModelInfo]
    limits: dict[str, Any]


@dataclass(frozen=True)
class Parsed:
    """A route's body as our own request, before the model is known."""

    req: GenerateRequest | EditFields
    upload: bytes | None = None  # an edit's image, still encoded
    check: Callable[[ModelInfo], None] | None = None  # the route's own checks against the model


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check and is ready to queue."""

    t0: float  # perf_counter when its route was entered
    info: ModelInfo
    req: GenerateRequest | EditFields
    image: Any = None  # an edit's image at the model's geometry: (H, W, C) uint8


def check_limits(req: _Request, text: str, limits: Limits, default_guidance: float = 0.0) -> None:
    """Config-dependent bounds; raises ApiError 422 naming the field. The guidance bound holds for
    the model's own default (`default_guidance`) as much as for a requested one."""
    problems = []
    if not limits.min_nfe <= req.nfe <= limits.max_nfe:
        problems.append(
            {
                "loc": ["nfe"],
                "msg": f"must be between {limits.min_nfe} and {limits.max_nfe}",
                "input": req.nfe,
            }
        )
    if not 1 <= req.num_images <= limits.max_images:
        problems.append(
            {
                "loc": ["num_images"],
                "msg": f"must be between 1 and {limits.max_images}",
                "input": req.num_images,
            }
        )
    if len(text) > limits.max_prompt_chars:
        problems.append(
            {
                "loc": [req.text_field],
                "msg": f"at most {limits.max_prompt_chars} characters",
                "input_length": len(text),
            }
        )
    guidance = default_guidance if req.guidance is None else req.guidance
    if not math.isfinite(guidance) or guidance > limits.max_guidance:
        what = "the model's default guidance is" if req.guidance is None else "at most"
        msg = (
            f"{what} {guidance}, over max_guidance {limits.max_guidance}"
            if req.guidance is None
            else f"{what} {limits.max_guidance}"
        )
        problems.append({"loc": ["guidance"], "msg": msg, "input": guidance})
    if req.format == "png" and req.num_images != 1:
        problems.append(
            {
                "loc": ["format"],
                "msg": "format 'png' returns one image: use num_images 1 or format 'base64-json'",
            }
        )
    if problems:
        raise ApiError(422, "invalid_request", "request values are out of bounds", problems)


def validated(schema: type[BaseModel], data: Any) -> Any:
    """`schema.model_validate(data)`, or ApiError 422 naming each field that does not fit."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "request does not match the schema", validation_details(exc)
        ) from None


def validation_details(exc: Any) -> list[dict[str, Any]]:
    """pydantic ValidationError -> JSON-safe list of {loc, msg, type}."""
    return json_safe(
        [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
    )
