"""`twinflow export <export> --format diffusers|diffusers_lora|comfyui_lora --out DIR`.

Converts a TwinFlow export (what training writes; local or s3://) into what other tools load:
a QwenImagePipeline directory, a LoRA for `pipeline.load_lora_weights`, a LoRA with ComfyUI key
names. Mounted by `twinflow.cli` through `add_commands`.
"""

from __future__ import annotations

import argparse
import sys

from twinflow.models.export_formats import FORMATS

FORMAT_HELP = (
    "diffusers: a QwenImagePipeline directory (also a full TwinFlow export); diffusers_lora: "
    "pytorch_lora_weights.safetensors for pipeline.load_lora_weights; comfyui_lora: one safetensors "
    "with ComfyUI's Qwen-Image LoRA keys"
)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a TwinFlow export to diffusers / ComfyUI formats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("export", help="a TwinFlow export directory (local or s3://)")
    p.add_argument(
        "--format", action="append", choices=FORMATS, required=True, dest="formats", help=FORMAT_HELP
    )
    p.add_argument("--out", required=True, help="output directory; each format goes to <out>/<format>")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    # at run time, so `twinflow export --help` loads neither pyarrow (storage) nor torch and diffusers
    from twinflow.models.export_converters import convert_export
    from twinflow.models.fetch import local_model_dir

    try:
        written = convert_export(local_model_dir(args.export), args.formats, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0
