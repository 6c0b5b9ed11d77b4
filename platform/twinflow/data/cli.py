"""`twinflow data ...`: build shards from a pipeline YAML, inspect a shard folder, precompute embeddings.

Mounted by `twinflow.cli` through `add_data_commands`; also runnable alone as `python -m twinflow.data`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Callable

from twinflow.config import ConfigError
from twinflow.data.bad_records import BadDataError
from twinflow.data.config import DataConfig, load_pipeline
from twinflow.data.embed_cache import build_embed_cache, cache_uri
from twinflow.data.latent_cache import add_cache_command
from twinflow.data.local import iter_local_records
from twinflow.data.shards import read_manifest, verify_checksums
from twinflow.storage import StorageError

Handler = Callable[[argparse.Namespace], int]


def _friendly(fn: Handler) -> Handler:
    """Known failure kinds become one 'error: ...' line and exit code 1 (config errors: 2)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (BadDataError, StorageError, FileNotFoundError, ValueError, KeyError) as exc:
            print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
            return 1

    return wrapper


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")


@_friendly
def _build(args: argparse.Namespace) -> int:
    from twinflow.data.build import build_pipeline  # its sources load fontTools: `--help` does without

    _setup_logging(args.quiet)
    overrides = list(args.set)
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    if args.endpoint:
        overrides.append(f"s3_endpoint={args.endpoint}")
    cfg = load_pipeline(args.pipeline, overrides)
    result = build_pipeline(cfg, output=args.output, progress=not args.no_progress)
    m = result.manifest
    print(f"{m.name} ({m.kind}) -> {result.uri}")
    for name, split in m.splits.items():
        print(f"  {name}: {split.count} records in {len(split.shards)} shards")
    bad = result.bad.summary()
    print(
        f"  bad records: {bad['bad']}"
        + (f" {json.dumps({k: v['count'] for k, v in bad['by_reason'].items()})}" if bad["bad"] else "")
    )
    print(f"  {result.seconds:.1f}s, {result.records_per_s:.0f} records/s")
    return 0


@_friendly
def _inspect(args: argparse.Namespace) -> int:
    m = read_manifest(args.uri, args.endpoint)
    if args.json:
        print(m.model_dump_json(indent=2))
    else:
        print(f"{m.name}: {m.kind}, {m.format} v{m.schema_version}, created {m.created_at}")
        print(
            f"  source: {m.source.get('name', m.source.get('type', '?'))}"
            f" ({m.source.get('license', 'license not recorded')})"
        )
        print(f"  images: {m.image_format}, mode {m.image_mode}, size {m.image_size or 'varies'}")
        print(f"  columns: {', '.join(f'{k}:{v}' for k, v in m.columns.items())}")
        for name, split in m.splits.items():
            size = sum(s.bytes for s in split.shards)
            print(f"  {name}: {split.count} records, {len(split.shards)} shards, {size / 1e6:.1f} MB")
        if m.embedding:
            print(
                f"  embedding cache: encoder={m.embedding.get('encoder_dir')} dim={m.embedding.get('dim')} "
                f"max_length={m.embedding.get('max_length')} dtype={m.embedding.get('dtype')}"
            )
        # A build has one report; an embedding cache has one per split it embedded.
        reports = {"build": m.bad_records} if "bad" in m.bad_records else m.bad_records
        for where, report in reports.items():
            by = {k: v["count"] for k, v in report.get("by_reason", {}).items()}
            print(f"  bad records ({where}): {report.get('bad', 0)}" + (f" {json.dumps(by)}" if by else ""))
    if args.samples:
        split = args.split or next(iter(m.splits))
        for i, rec in enumerate(iter_local_records(_cfg(args, split))):
            if i >= args.samples:
                break
            extra = f" | {rec['instruction']}" if "instruction" in rec else ""
            print(f"  [{split}] {rec['id']}: {rec['caption']}{extra}")
    if args.verify:
        problems = verify_checksums(args.uri, m, args.endpoint)
        for path, problem in problems.items():
            print(f"  BAD {path}: {problem}")
        print(f"  checksums: {'all ok' if not problems else f'{len(problems)} shard(s) differ'}")
        return 1 if problems else 0
    return 0


def _cfg(args: argparse.Namespace, split: str):
    m = read_manifest(args.uri, args.endpoint)
    size = m.image_size[0] if m.image_size else 32
    return DataConfig(
        path=args.uri,
        split=split,
        s3_endpoint=args.endpoint,
        image_size=size,
        channels=1 if m.image_mode == "L" else 3,
    )


@_friendly
def _embed(args: argparse.Namespace) -> int:
    import ray  # this command only: `twinflow data --help` stays Ray-free

    _setup_logging(args.quiet)
    cfg = DataConfig(
        path=args.uri,
        split=args.split,
        s3_endpoint=args.endpoint,
        text_column=args.text_column,
        text_max_length=args.max_length,
        text_encoder_dir=args.encoder_dir,
        embed_cache=True,
        embed_cache_path=args.cache,
        embed_cache_dtype=args.dtype,
        embed_actors=args.actors,
        embed_device=args.device,
    )
    if not ray.is_initialized():
        ray.init(
            address=args.address,
            include_dashboard=False,
            **({} if args.address else {"num_cpus": args.num_cpus}),
        )
    m = build_embed_cache(cfg, progress=not args.no_progress)
    print(
        f"embedding cache {cache_uri(cfg)}: {m.splits[args.split].count} records of {args.split}, "
        f"dim {m.embedding['dim']}, {m.embedding['dtype']}"
    )
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data build|inspect|embed` to a parent's subparsers; each leaf sets ``func(args) -> int``."""
    data = subparsers.add_parser(
        "data", help="build, inspect and embed image-text / edit-pair shards", description=__doc__
    )
    _add_leaves(data)
    return data


def _add_leaves(parent: argparse.ArgumentParser) -> None:
    sub = parent.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("build", help="run a pipeline YAML into parquet shards + manifest (local or s3://)")
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/fashion_mnist.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field, e.g. --set limit=100 (repeatable)",
    )
    p.add_argument("--output", help="local folder or s3://bucket/prefix (default: the YAML's output)")
    p.add_argument("--limit", type=int, help="at most this many records per split")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: $TWINFLOW_S3_ENDPOINT / $AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_build)

    p = sub.add_parser("inspect", help="print a shard folder's manifest and counts")
    p.add_argument("uri", help="shard folder or s3://bucket/prefix")
    p.add_argument("--endpoint")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--verify", action="store_true", help="recompute every shard's sha256")
    p.add_argument("--samples", type=int, default=0, help="print the first N records of --split")
    p.add_argument("--split")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("embed", help="precompute the text-embedding cache of a split (Ray actor pool)")
    p.add_argument("uri", help="shard folder or s3://bucket/prefix")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="caption", choices=["caption", "instruction"])
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--encoder-dir", help="text encoder folder (default: the packaged MiniLM)")
    p.add_argument(
        "--cache", help="cache location (default: <uri>/embeddings/<encoder>-L<len>-<column>-<dtype>)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--actors", type=int, default=1, help="text-encoder actor pool size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--endpoint")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_embed)

    add_cache_command(sub)


def main_data(argv: list[str] | None = None) -> int:
    """`python -m twinflow.data build ...`: the same commands without the `twinflow data` prefix."""
    parser = argparse.ArgumentParser(prog="python -m twinflow.data", description=__doc__)
    _add_leaves(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)
