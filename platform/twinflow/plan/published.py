"""The published component configs of the supported pretrained families, shipped with the package.

`twinflow plan` needs only the `config.json` of the transformer, the VAE and the text encoder. A
team asks "will it fit, on what?" before downloading ~57 GB of weights, so when the job's paths hold
no config the plan falls back to these (and says so in its output).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twinflow.models.config import ModelConfig

# The model modules (diffusers' transformer classes, presets, the published-config helpers) load inside
# the functions that build or count a model: `twinflow plan --help` and the report's pure arithmetic
# (memory.py imports this module for its fitted figures) stay free of diffusers.

PUBLISHED_DIR = Path(__file__).with_name("published")
COMPONENTS = ("transformer", "vae", "text_encoder")


def published_configs(family: str) -> dict | None:
    """{'source', 'transformer', 'vae', 'text_encoder'} for `family`, or None when none ships."""
    path = PUBLISHED_DIR / f"{family}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _has_config(component: str, path: str) -> bool:
    from twinflow.models.qwen_text import encoder_dirs
    from twinflow.models.registry import transformer_dir
    from twinflow.models.vae import vae_dir

    find = {"transformer": transformer_dir, "vae": vae_dir, "text_encoder": encoder_dirs}[component]
    try:
        find(path)
    except FileNotFoundError:
        return False
    return True


def _write_pipeline(configs: dict, root: Path) -> None:
    """A config-only pipeline directory: what every reader of `plan` opens (no weights, no tokenizer
    files: the plan never tokenizes)."""
    for part in COMPONENTS:
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(configs[part], indent=2))
    (root / "tokenizer").mkdir()


@contextmanager
def with_published_configs(cfg: ModelConfig) -> Iterator[tuple[ModelConfig, list[str]]]:
    """`cfg` with every pretrained component whose path holds no config.json pointed at the family's
    published config, and one line per component saying which config the plan uses."""
    paths = {
        "transformer": cfg.pretrained_path,
        "vae": cfg.vae_path,
        "text_encoder": cfg.text_encoder_spec["path"],
    }
    wanted = {k: v for k, v in paths.items() if v is not None}
    missing = [k for k, v in wanted.items() if not _has_config(k, str(v))]
    notes = [f"{k}: {wanted[k]}" for k in wanted if k not in missing]
    if not missing:
        yield cfg, notes
        return
    configs = published_configs(cfg.family)
    if configs is None:
        part = missing[0]
        raise FileNotFoundError(
            f"model.{_FIELD[part]} {wanted[part]}: no {part} config.json there, and no published "
            f"{cfg.family} config ships with twinflow to plan without it"
        )
    with tempfile.TemporaryDirectory(prefix="twinflow-published-") as tmp:
        root = Path(tmp)
        _write_pipeline(configs, root)
        update = {}
        if cfg.text_encoder == "qwen2.5-vl":  # follows pretrained_path only when unset: pin it
            update["text_encoder_path"] = str(wanted["text_encoder"])
        for part in missing:
            if part == "text_encoder":
                update["text_encoder_path"] = str(root)
            else:
                update[_FIELD[part]] = str(root)
            notes.append(
                f"{part}: published config of {configs['source'].split(' ')[0]} shipped with twinflow "
                f"({wanted[part]} holds no {part} config.json)"
            )
        yield cfg.model_copy(update=update), notes


_FIELD = {"transformer": "pretrained_path", "vae": "vae_path", "text_encoder": "text_encoder_path"}
