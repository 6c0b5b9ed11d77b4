"""`twinflow data cache`: image-text / edit shards -> latent + text-state shards, so training at 20B
never runs the VAE or the 7B text encoder (peers cache first too: DiffSynth-Studio, SimpleTuner).

A Ray Data job: the source shards are read, decoded exactly as training decodes them (same
`DecodeSpec`), and an actor pool (one GPU per actor when the cluster has GPUs) encodes images with
the model's VAE (`LatentCodec`: normalised posterior mode) and captions with its text encoder.
The cache is a normal shard folder whose manifest `embedding.latent` records which VAE and text
encoder made it (their paths and config hashes), the geometry, and the source shard ids.

Training pointed at a cache streams `image` = the latent (and `source_image` = the source latent
for edit pairs) plus `text_states`/`text_mask` without loading either model
(`latent_train_dataset`); `data.compatibility.check_latent_cache_for_model` refuses a job whose VAE,
text encoder, image size or crop differ from the manifest's.

`twinflow data --help` mounts this module's command, so it imports neither torch nor Ray at the top:
the models (torch) load in the encoder actor, Ray in the build.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinflow import storage
from twinflow.config.loading import read_yaml, validate
from twinflow.data import shards
from twinflow.data.config import DataConfig, load_pipeline
from twinflow.data.decode import DecodeSpec, decode_rows
from twinflow.data.latent_stream import DTYPE, cache_schema, is_latent_cache
from twinflow.data.reader import open_split
from twinflow.models.config import ModelConfig
from twinflow.models.fetch import local_model_dir

log = logging.getLogger("twinflow.data")


def config_sha256(model_dir: str | Path | None, part: str | None) -> str:
    """sha256 of a component's config.json (canonical JSON): which weights' architecture made the cache."""
    from twinflow.models.text_encoder import default_model_dir  # imports torch

    root = default_model_dir() if model_dir is None else local_model_dir(model_dir)
    path = (
        root / part / "config.json"
        if part and (root / part / "config.json").is_file()
        else root / "config.json"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no config.json{f' (or {part}/config.json)' if part else ''}")
    return hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What a cache depends on; recorded in its manifest and compared with a training job's."""

    vae_path: str
    text_encoder: str  # "minilm" or "qwen2.5-vl"
    text_encoder_path: str | None
    max_length: int
    image_size: int
    crop: str = "center"
    text_column: str = "caption"

    def key(self) -> dict[str, Any]:
        te_part = "text_encoder" if self.text_encoder == "qwen2.5-vl" else None
        return {
            **asdict(self),
            "vae_config_sha256": config_sha256(self.vae_path, "vae"),
            "text_encoder_config_sha256": config_sha256(self.text_encoder_path, te_part),
        }

    def text_spec(self) -> dict[str, Any]:
        return {"kind": self.text_encoder, "path": self.text_encoder_path, "max_length": self.max_length}


def spec_for_job(job) -> CacheSpec:
    """The cache a training job needs: its model's VAE and text encoder, its data geometry."""
    return spec_for_sections(job.model, job.data)


def spec_for_sections(m, d) -> CacheSpec:
    """From a job's `model:` (ModelConfig) and `data:` (DataConfig) sections."""
    if m.vae_path is None:
        raise ValueError("model.vae_path is not set: a latent cache is for latent-space models")
    te = m.text_encoder_spec
    return CacheSpec(
        m.vae_path, te["kind"], te["path"], d.text_max_length, d.image_size, d.crop, d.text_column
    )


def spec_for_model(source: str) -> CacheSpec:
    """`--model`: a job YAML (its model and data sections), or an export directory (its recorded
    model config; crop center, captions)."""
    if source.endswith((".yaml", ".yml")):
        raw = read_yaml(source)
        for section in ("model", "data"):
            if not isinstance(raw.get(section), dict):
                raise ValueError(f"--model {source}: no {section}: section (expected a training job YAML)")
        return spec_for_sections(
            validate(ModelConfig, raw["model"], f"{source} model"),
            validate(DataConfig, raw["data"], f"{source} data"),
        )
    meta_path = Path(source) / "twinflow.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"--model {source}: neither a job YAML nor an export (no twinflow.json)")
    meta = json.loads(meta_path.read_text())
    latent = meta.get("latent") or {}
    if not latent:
        raise ValueError(f"--model {source}: a pixel-space export has no VAE to cache latents with")
    vae = str(Path(source) / latent["vae_dir"]) if latent.get("vae_dir") else latent["vae_path"]
    te = meta.get("text_encoder") or {}
    return CacheSpec(
        vae, te.get("kind", "minilm"), te.get("path"), int(te.get("max_length", 32)), int(meta["image_size"])
    )


class LatentCacheStage:
    """Ray Data actor: raw shard rows -> latents + compact text states (valid tokens only)."""

    def __init__(self, spec: dict[str, Any], edit: bool, device: str = "cpu", tracker: Any = None) -> None:
        import torch  # torch and the models load in the encoder actor only

        from twinflow.models.text_encoder import open_text_encoder  # imports torch
        from twinflow.models.vae import LatentCodec  # imports torch

        self.spec = CacheSpec(**spec)
        self.device = torch.device(device)
        self.codec = LatentCodec.from_pretrained(local_model_dir(self.spec.vae_path)).to(self.device)
        self.encoder = open_text_encoder(self.spec.text_spec(), self.spec.max_length, device)
        self.decode = DecodeSpec(
            image_size=self.spec.image_size,
            channels=3,
            crop=self.spec.crop,
            text_column=self.spec.text_column,
            edit_pairs=edit,
            text_max_length=self.spec.max_length,
        )
        self.edit, self.tracker = edit, tracker

    def _latents(self, images: np.ndarray) -> list[bytes]:
        import torch  # the actor's: see __init__

        z = self.codec.encode(torch.from_numpy(images).to(self.device)).cpu().numpy().astype(DTYPE)
        return [row.tobytes() for row in z]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, bad = decode_rows(batch, self.decode)
        if bad:
            if self.tracker is None:
                raise ValueError(f"{len(bad)} bad records: {bad[0]}")
            self.tracker.report(bad)
        texts = [str(t) for t in rows[self.spec.text_column if self.edit else "caption"]]
        enc = self.encoder.encode(texts) if texts else None
        states = enc["text_states"].float().cpu().numpy() if enc else np.zeros((0, 1, 1), np.float32)
        lengths = enc["text_mask"].sum(dim=1).cpu().numpy() if enc else np.zeros(0, np.int64)
        out = {
            "id": rows["id"],
            "caption": rows["caption"],
            "label": rows["label"].astype(np.int32),
            "latent": np.array(self._latents(rows["image"]), dtype=object),
            "text_states": np.array(
                [s[:n].astype(DTYPE).tobytes() for s, n in zip(states, lengths)], dtype=object
            ),
            "text_len": lengths.astype(np.int32),
        }
        if self.edit:
            out["source_latent"] = np.array(self._latents(rows["source_image"]), dtype=object)
            out["instruction"] = rows["instruction"]
        return out


def build_latent_cache(
    source_uri: str,
    spec: CacheSpec,
    out_uri: str,
    *,
    split: str = "train",
    endpoint: str | None = None,
    actors: int = 1,
    batch_size: int = 16,
    max_bad_fraction: float = 0.01,
) -> shards.Manifest:
    """Encode `split` of the shard folder `source_uri` into a latent cache at `out_uri` (local or s3://)."""
    import ray  # only a build needs Ray

    from twinflow.data.tracking import make_tracker  # imports Ray

    source = open_split(source_uri, split, endpoint)
    if is_latent_cache(source.manifest):
        raise ValueError(f"{source_uri} is a latent cache already; point `data cache` at the image shards")
    if not source.usable:
        raise storage.MissingPathError(f"{source_uri}: split {split!r} has no readable shards to cache")
    kind = source.manifest.kind
    edit = kind == "edit_pairs"
    if spec.text_column == "instruction" and not edit:
        raise ValueError(
            f"{source_uri}: text_column instruction needs an edit-pairs dataset (this one is {kind})"
        )
    key = spec.key()
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    # the cluster's GPUs, not the driver's: `ray job submit` runs this on a CPU head node
    use_gpu = gpus >= 1
    name = (
        "twinflow-bad-records-cache-"
        + hashlib.sha1(f"{source_uri}|{out_uri}|{split}".encode()).hexdigest()[:12]
    )
    tracker = make_tracker(name, source.expected, max_bad_fraction, f"records cached from {split}")
    tracker.report(list(source.bad))
    shards.remove_previous(out_uri, endpoint)  # an interrupted rebuild leaves no manifest behind
    ds = ray.data.read_parquet(source.paths, filesystem=source.fs)
    ds = ds.map_batches(
        LatentCacheStage,
        batch_format="numpy",
        batch_size=batch_size,
        fn_constructor_kwargs={
            "spec": asdict(spec),
            "edit": edit,
            "device": "cuda" if use_gpu else "cpu",
            "tracker": tracker,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else None,
        num_cpus=1,
    )
    shard_size = max((s.count for s in source.manifest.split(split).shards), default=1000)
    writer = shards.ShardWriter(out_uri, split, cache_schema(edit), shard_size, endpoint)
    first = None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if first is None and batch.num_rows:
            first = batch.slice(0, 1).to_pylist()[0]
        writer.add_table(batch)
    info = writer.close()
    if first is None:
        raise ValueError(f"{source_uri}: no usable records in split {split!r}")
    dim = len(first["text_states"]) // 4 // first["text_len"]
    shape = _latent_shape(spec, len(first["latent"]) // 4)
    src = source.manifest
    manifest = shards.Manifest(
        name=f"{src.name}-latents",
        kind=kind,
        columns={f.name: str(f.type) for f in cache_schema(edit)},
        image_format="latent",
        image_mode=DTYPE,
        image_size=[shape[2], shape[1]],
        seed=src.seed,
        source={**src.source, "cached_from": source_uri, "dataset_name": src.name},
        pipeline=src.pipeline,
        splits={split: info},
        bad_records={split: tracker.summary()},
        embedding={
            "text_column": spec.text_column,
            "max_length": spec.max_length,
            "dim": dim,
            "dtype": DTYPE,
            "latent": {
                **key,
                "shape": list(shape),
                "dtype": DTYPE,
                "source_shards": [{"path": s.path, "sha256": s.sha256} for s in source.usable],
            },
        },
    )
    shards.write_manifest(out_uri, manifest, endpoint)
    log.info("wrote latent cache %s: %d records of %s, latents %s", out_uri, info.count, split, shape)
    return manifest


def _latent_shape(spec: CacheSpec, numel: int) -> tuple[int, int, int]:
    from twinflow.models.vae import vae_geometry  # imports torch

    _, channels, factor = vae_geometry(local_model_dir(spec.vae_path))
    side = spec.image_size // factor
    if channels * side * side != numel:
        raise ValueError(f"latent of {numel} values is not {channels}x{side}x{side}")
    return channels, side, side


def _source_uri(source: str) -> str:
    """A shard folder/URI as is; a pipeline YAML -> the output it builds (built already)."""
    if source.endswith((".yaml", ".yml")):
        return str(load_pipeline(source).output)
    return source


def _cache_command(args) -> int:
    import ray  # only this command needs Ray

    spec = spec_for_model(args.model)
    if args.image_size:
        spec = CacheSpec(**{**asdict(spec), "image_size": args.image_size})
    if not ray.is_initialized():
        ray.init(
            address=args.address,
            include_dashboard=False,
            **({} if args.address else {"num_cpus": args.num_cpus}),
        )
    m = build_latent_cache(
        _source_uri(args.source),
        spec,
        args.out,
        split=args.split,
        endpoint=args.endpoint,
        actors=args.actors,
        batch_size=args.batch_size,
    )
    lat = m.embedding["latent"]
    print(
        f"latent cache {args.out}: {m.splits[args.split].count} records of {args.split}, latents "
        f"{'x'.join(map(str, lat['shape']))}, text states {m.embedding['dim']}-d (VAE {lat['vae_path']}, "
        f"text encoder {lat['text_encoder']})"
    )
    return 0


def add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache", help="encode shards into latent + text-state shards for training (Ray actor pool)"
    )
    p.add_argument("source", help="a shard folder / s3:// URI, or the pipeline YAML that built it")
    p.add_argument(
        "--model", required=True, help="the job YAML (its model's VAE and text encoder) or an export"
    )
    p.add_argument("--out", required=True, help="where the cache goes: local folder or s3://bucket/prefix")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--image-size", type=int, help="pixel size to encode at (default: the job's data.image_size)"
    )
    p.add_argument(
        "--actors", type=int, default=1, help="encoder actors (one GPU each when the cluster has GPUs)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--endpoint", help="S3 endpoint URL (default: $TWINFLOW_S3_ENDPOINT / $AWS_ENDPOINT_URL)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.set_defaults(func=_cache_command)
