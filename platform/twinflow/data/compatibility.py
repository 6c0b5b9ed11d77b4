"""Does this data fit this job? Every check of a shard folder against the data section and the model
that will read it, on a manifest the caller has already read.

The driver reads `data.path`'s manifest once (`read_data_manifest`, in `train.resolved.resolve_job`)
and runs `check_data_for_job` before Ray starts; the data pipeline runs `check_data_section` on the
manifest it streams from. Each error names the folder and the field to change: a mismatch found
here would otherwise surface deep in a worker as a shape error, or train on the wrong text states.

    data section vs data     text column of edit pairs, embedding cache's text column and length,
                             latent cache's text column, length and pixel size
    model vs data            text states' encoder and width; latent cache's VAE, text encoder and geometry
"""

from __future__ import annotations

from typing import Any

from twinflow.config import ConfigError
from twinflow.data import shards
from twinflow.data.latent_cache import spec_for_job
from twinflow.data.latent_stream import is_latent_cache
from twinflow.storage import is_s3


def read_data_manifest(data: Any) -> shards.Manifest | None:
    """`data.path`'s manifest, or None when it cannot be read yet (the existence checks and the
    reader report that in their own words)."""
    try:
        return shards.read_manifest(data.path, data.s3_endpoint)
    except (OSError, ValueError):
        return None


def check_data_for_job(job: Any, manifest: shards.Manifest | None) -> None:
    """Every check of `data.path` (its manifest) against the job's model and data section; the
    model's first, whose errors say which encoder or VAE the data needs."""
    if manifest is None:
        return
    check_text_states(job, manifest)
    check_latent_cache_for_model(job, manifest)
    check_data_section(job.data, manifest)


def check_data_section(cfg: Any, manifest: shards.Manifest) -> None:
    """The data section asks for what the folder holds: edit pairs for an edit job, and a cache made
    with the text column, text length (and pixel size) the section sets."""
    if is_latent_cache(manifest):
        check_latent_cache(cfg, manifest)
        return
    check_edit_pairs(cfg, manifest)
    if manifest.embedding is not None:
        check_embedding_cache(cfg, manifest)


def check_edit_pairs(cfg: Any, manifest: shards.Manifest) -> None:
    if cfg.is_edit and manifest.kind != "edit_pairs":
        raise ValueError(
            f"{cfg.path}: text_column=instruction needs an edit-pairs dataset (this one is {manifest.kind})"
        )


def check_embedding_cache(cfg: Any, manifest: shards.Manifest) -> dict[str, Any]:
    """The embedding cache's `embedding` when it was made with the section's text column and length."""
    emb = manifest.embedding or {}
    for field, want in (("text_column", cfg.text_column), ("max_length", cfg.text_max_length)):
        if emb.get(field) != want:
            raise ValueError(
                f"{cfg.path}: this embedding cache has {field}={emb.get(field)!r} but the config "
                f"asks for {want!r}; rebuild it with `twinflow data embed` or change the config"
            )
    return emb


def check_latent_cache(cfg: Any, manifest: shards.Manifest) -> dict[str, Any]:
    """The latent cache's `embedding` when it fits the data section (text column, length, pixel size)."""
    emb = manifest.embedding or {}
    have = {
        "text_column": emb.get("text_column"),
        "max_length": emb.get("max_length"),
        "image_size": emb.get("latent", {}).get("image_size"),
    }
    want = {"text_column": cfg.text_column, "max_length": cfg.text_max_length, "image_size": cfg.image_size}
    for field, value in want.items():
        if have[field] != value:
            raise ValueError(
                f"{cfg.path}: this latent cache has {field}={have[field]!r} but data asks for "
                f"{value!r}; rebuild it with `twinflow data cache` or change the config"
            )
    return emb


# Fields of a latent cache's key that the job's model and data section must reproduce.
LATENT_KEY_FIELDS = (
    "vae_config_sha256",
    "text_encoder",
    "text_encoder_config_sha256",
    "max_length",
    "image_size",
    "crop",
    "text_column",
)


def check_latent_cache_for_model(job: Any, manifest: shards.Manifest) -> None:
    """Refuse a job whose VAE, text encoder or geometry differ from its latent cache's (no-op for
    other data)."""
    if not is_latent_cache(manifest):
        return
    have = manifest.embedding["latent"]
    want = spec_for_job(job).key()
    for field in LATENT_KEY_FIELDS:
        if have.get(field) != want[field]:
            raise ValueError(
                f"{job.data.path}: this latent cache was made with {field}={have.get(field)!r} but the job's model "
                f"needs {want[field]!r} (cache from vae {have.get('vae_path')}, text encoder "
                f"{have.get('text_encoder')} {have.get('text_encoder_path')}); rebuild it with "
                "`twinflow data cache ... --model <this job>`"
            )


# ---------------------------------------------------------------------------- text states vs model
# The encoder modules import torch: imported inside the functions that need them, because Ray Data's
# decode tasks import this module (through data.streaming) and stay torch-free.
def check_text_states(job: Any, manifest: shards.Manifest | None) -> None:
    """A model reads the text states of one encoder (kind and width). Data whose cached states (a
    latent or embedding cache at `data.path`) or whose `data.text_encoder_dir` come from another one
    is refused (ConfigError naming both); otherwise it fails deep in a worker as a shape error.
    Data that cannot be read yet (`manifest` None) passes: its own checks report that."""
    if not job.data.embed_text or manifest is None:
        return
    where, kind, path, dim = _data_text_states(job.data, manifest)
    want_kind, want_path, want_dim = _model_text_states(job.model)
    if kind == want_kind and (dim is None or want_dim is None or dim == want_dim):
        return
    raise ConfigError(
        f"{where} gives {_describe(kind, path, dim)} text states, but the model reads "
        f"{_describe(want_kind, want_path, want_dim)} ones (model.text_encoder: {want_kind}): "
        + (
            "set data.text_encoder_dir to the model's encoder (or change model.text_encoder)"
            if where.startswith("data.text_encoder_dir")
            else "rebuild the cache for this model (`twinflow data cache <source> --model <this job>`, "
            "or `twinflow data embed`) or change model.text_encoder"
        )
    )


def _describe(kind: str, path: str | None, dim: int | None) -> str:
    return kind + (f" ({', '.join(str(p) for p in (path, dim and f'{dim}-d') if p)})" if path or dim else "")


def _data_text_states(data: Any, manifest: shards.Manifest) -> tuple[str, str, str | None, int | None]:
    """(where, encoder kind, its path, state width or None) of the states the data section gives."""
    emb = manifest.embedding
    if emb and "latent" in emb:
        lat = emb["latent"]
        where = f"data.path {data.path} (a latent cache)"
        return where, lat.get("text_encoder", "minilm"), lat.get("text_encoder_path"), emb.get("dim")
    if emb:
        kind, path, _ = _encoder_of_dir(emb.get("encoder_dir"))
        return f"data.path {data.path} (an embedding cache)", kind, path, emb.get("dim")
    kind, path, dim = _encoder_of_dir(data.text_encoder_dir)
    return f"data.text_encoder_dir ({data.text_encoder_dir or 'unset: the packaged MiniLM'})", kind, path, dim


def _encoder_of_dir(path: str | None) -> tuple[str, str | None, int | None]:
    """What `text_encoder_for_dir` opens for a data section's encoder dir ("default"/None: MiniLM)."""
    # the text-encoder modules import torch and transformers: only jobs with text states need them
    from twinflow.models.qwen_text import is_qwen_pipeline
    from twinflow.models.text_encoder import TEXT_DIM

    if path in (None, "default"):
        return "minilm", None, TEXT_DIM
    if is_qwen_pipeline(path):
        return "qwen2.5-vl", path, _qwen_width(path)
    return "minilm", path, None  # a BERT-style encoder, as MiniLM


def _model_text_states(model: Any) -> tuple[str, str | None, int | None]:
    # as in _encoder_of_dir: torch and transformers only for jobs with text states
    from twinflow.models.text_encoder import TEXT_DIM

    spec = model.text_encoder_spec
    if spec["kind"] == "minilm":
        return "minilm", None, TEXT_DIM
    return spec["kind"], spec["path"], _qwen_width(spec["path"])


def _qwen_width(path: str) -> int | None:
    """A local Qwen-Image pipeline's text width (its config alone); None for s3:// or unreadable."""
    # as in _encoder_of_dir
    from twinflow.models.qwen_text import encoder_width, resolve_encoder_path

    if is_s3(str(path)):
        return None
    try:
        return encoder_width(resolve_encoder_path(path))
    except (OSError, ValueError):
        return None
