"""One job as the driver resolved it: loaded, its data manifest read once, every input checked once.

`resolve_job` runs before Ray starts (and before anything is written), so a bad input is one line
naming the field (and the job file); the launcher, the data pipeline and the workers' config then
take what it found instead of reading the manifest again:

    job file -> load_job -> resolve_job -> ResolvedJob -> prepare_run -> build_trainer -> fit
                              |- read_data_manifest(job.data)       once
                              |- inputs under Ray's runtime-env copy (paths.check_not_in_runtime_env)
                              |- data vs job and model            (data.compatibility)
                              |- every input path exists
                              |- periodic eval's real images and prompts (eval.periodic)

Workers on other nodes still open the shards themselves (Ray Data reads them where they run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinflow import storage
from twinflow.config import ConfigError
from twinflow.data import shards
from twinflow.data.compatibility import check_data_for_job, read_data_manifest
from twinflow.eval.periodic import check_prompts, check_reference, judge_dataset, reference_of, uses_reference
from twinflow.train.config import JobConfig
from twinflow.train.paths import check_not_in_runtime_env


@dataclass(frozen=True)
class ResolvedJob:
    """`job` with absolute local paths (Ray workers run in their own working directory), and what
    the driver learnt checking it."""

    job: JobConfig
    source: str | None  # the job file, named in input errors
    manifest: shards.Manifest | None  # data.path's; None when it could not be read
    judge: str | None  # periodic eval's judge for the data (its manifest's source type), if any
    inputs: tuple[tuple[str, str, str | None], ...]  # (field, path, endpoint) the workers read

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all workers."""
        return self.job.global_batch

    @property
    def group_split(self) -> dict[str, int] | None:
        """Rows of the global batch per TwinFlow group; None for objectives without groups."""
        split = getattr(self.job.method, "split", None)
        return split(self.job.global_batch).as_dict() if split is not None else None


def resolve_job(job: JobConfig, source: str | None = None) -> ResolvedJob:
    """Check every input of `job` once (ConfigError naming the field, prefixed with `source`; a
    ValueError naming the folder for data that does not fit the model) and return it resolved.
    Writes nothing; `job` itself is left as it was."""
    try:
        return _resolve(job, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _resolve(job: JobConfig, source: str | None) -> ResolvedJob:
    manifest = read_data_manifest(job.data)
    judge = judge_dataset(manifest)
    inputs = job_inputs(job, judge)
    for field_name, uri, _ in inputs:  # under `ray job submit`: say what to do, not just "missing"
        check_not_in_runtime_env(field_name, uri, must_exist=True)
    check_not_in_runtime_env("output.dir", job.output.dir, must_exist=False)
    check_data_for_job(job, manifest)  # e.g. another encoder's text states than the model reads
    for field_name, uri, endpoint in inputs:
        try:
            found = storage.exists(uri, endpoint)
        except OSError as exc:
            raise ConfigError(f"{field_name}: {uri}: cannot be read ({exc})") from None
        if not found:
            raise ConfigError(f"{field_name}: {uri} does not exist")
    check_reference(job, judge, manifest)  # periodic eval's real images: an eval and a train split
    if job.eval.metrics and job.eval.prompts:  # a prompt naming no class of the data fails here
        check_prompts(judge, job.eval.prompts)
    job = absolute_paths(job)
    return ResolvedJob(
        job=job,
        source=source,
        manifest=manifest,
        judge=judge,
        inputs=tuple(job_inputs(job, judge)),
    )


def job_inputs(job: JobConfig, judge: str | None) -> list[tuple[str, str, str | None]]:
    """(field, path, endpoint) of every file or folder the job reads on its workers: its data, the
    export it starts from, model weights, text encoder, and periodic eval's real images (`judge`:
    the data's judge dataset, which decides whether periodic eval reads any)."""
    model = job.model
    named = [
        ("data.path", job.data.path, job.data.s3_endpoint),
        ("train.init_from", job.train.init_from, job.output.s3_endpoint),
        ("model.pretrained_path", model.pretrained_path, job.data.s3_endpoint),
        ("model.vae_path", model.vae_path, job.data.s3_endpoint),
        ("model.text_encoder_path", model.text_encoder_path, job.data.s3_endpoint),
        ("data.text_encoder_dir", job.data.text_encoder_dir, job.data.s3_endpoint),
    ]
    if job.eval.reference and uses_reference(job, judge):
        named.append(("eval.reference", *reference_of(job)))
    return [(f, str(p), e) for f, p, e in named if p and p != "default"]


def absolute_paths(job: JobConfig) -> JobConfig:
    """A copy of `job` whose local input paths are absolute: Ray workers run in their own working
    directory."""
    job = job.model_copy(deep=True)
    if job.train.init_from and "://" not in job.train.init_from:
        job.train.init_from = str(Path(job.train.init_from).expanduser().resolve())
    if "://" not in job.data.path:
        job.data.path = str(Path(job.data.path).expanduser().resolve())
    if job.eval.reference and "://" not in job.eval.reference:
        job.eval.reference = str(Path(job.eval.reference).expanduser().resolve())
    return job
