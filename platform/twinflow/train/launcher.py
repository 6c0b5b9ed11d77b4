"""Driver side of `twinflow train`: resolve the job (`train.resolved`: its inputs checked once),
start (or join) Ray, run the TorchTrainer, summarise.

Ray Train V2 owns the job's state machine (initializing -> scheduling -> running -> restarting ->
finished/errored); we report its final state rather than inventing our own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from twinflow.atomic_files import write_text_atomic
from twinflow.config import ConfigError
from twinflow.data import build_train_dataset
from twinflow.data.streaming import bad_record_report
from twinflow.data.tracking import live_tracker, tracker_name
from twinflow.models.text_encoder import open_text_encoder
from twinflow.storage import check_bucket, delete_dir, exists, is_s3, s3_filesystem, upload_dir
from twinflow.train.checkpointing import TAG, newest_layout
from twinflow.train.config import JobConfig, load_job
from twinflow.train.engine import zero_stage_for
from twinflow.train.failures import (
    StopOnDeterministicFailure,
    deterministic_message,
    train_loop_keeping_traceback,
    write_failure_log,
)
from twinflow.train.lifeline import driver_info
from twinflow.train.paths import check_remote_run, remove_run_dir
from twinflow.train.progress import FollowLines, plot_losses
from twinflow.train.relayout import RelayoutError, prepare
from twinflow.train.resolved import ResolvedJob, resolve_job
from twinflow.train.staging import staging_root
from twinflow.train.summary import write_summary

log = logging.getLogger(__name__)

WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients (the PG cleaner) look first
VERBOSE_ENV = "TWINFLOW_VERBOSE"  # "1" (`twinflow --verbose`): Ray's own output reaches the terminal
_forwarding: bool | None = None  # whether Ray forwards worker output to this driver (ensure_ray)

# The S3 endpoint and region travel from the driver to the workers (s3:// data, output, init_from).
# Credentials never do: a runtime env is shown by the dashboard and the state API, so each worker
# resolves them itself through the AWS chain (its node's environment, as a local cluster inherits
# the driver's, or its instance / pod role). docs/security.md has the threat model.
FORWARDED_ENV = (
    "TWINFLOW_S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def worker_env() -> dict[str, str]:
    return {**WORKER_ENV, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


@dataclass
class JobResult:
    ok: bool
    state: str
    run_dir: str
    steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    export_dir: str | None = None
    error: str | None = None
    remote_dir: str | None = None
    bad_records: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def is_remote(job: JobConfig) -> bool:
    return is_s3(job.output.dir)


def run_dir_of(job: JobConfig) -> Path:
    """Where workers write logs, samples and the export. For s3:// output: a local staging folder
    (uploaded to `<output.dir>/<name>/` when the job ends), while checkpoints go straight to S3."""
    if is_remote(job):
        return staging_root() / job.name
    return Path(job.output.dir).expanduser().resolve() / job.name


def remote_run_uri(job: JobConfig) -> str | None:
    return job.output.dir.rstrip("/") + "/" + job.name if is_remote(job) else None


def _storage(job: JobConfig, run_dir: Path) -> dict[str, Any]:
    """RunConfig storage: the run directory's parent, or the s3:// prefix through pyarrow's S3 client."""
    if not is_remote(job):
        return {"storage_path": str(run_dir.parent)}
    check_bucket(job.output.dir, job.output.s3_endpoint)  # a missing bucket fails before workers start
    return {
        "storage_path": job.output.dir[len("s3://") :].rstrip("/"),
        "storage_filesystem": s3_filesystem(job.output.s3_endpoint),
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(job: JobConfig, address: str | None) -> None:
    """Join `address` (or the job's, or RAY_ADDRESS, which `ray job submit` sets for its driver), else
    start an embedded local cluster sized to never starve Ray Data.

    The local cluster runs its own dashboard on a free 127.0.0.1 port, and RAY_API_SERVER_ADDRESS
    (inherited by its raylet, so by every worker) names it. Ray Train's placement-group cleaner asks
    the state API whether the Train controller lives. Without a dashboard the address it finds is the
    machine-wide default 127.0.0.1:8265; without the variable it looks the cluster up by scanning for
    running GCS processes and takes the newest, on a shared machine perhaps another one. Unanswered,
    it logs "Failed to query" forever; answered by ANOTHER cluster, our live controller is "not
    found", read as dead, and its placement group (both workers) is removed mid-run."""
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    address = address or job.cluster.address or os.environ.get("RAY_ADDRESS")
    global _forwarding
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    if address:
        # The job's actors (Train's placement-group cleaner among them) find the state API through
        # RAY_ADDRESS; unset, they scan the machine for clusters ("Found multiple active Ray instances").
        env = {**WORKER_ENV, **_cluster_address_env(address)}
        # Quiet as locally: the driver prints rank 0's lines from the run directory on shared storage
        # (FollowLines), so `ray job logs` shows our progress and results, not DeepSpeed's or Ray's
        # chatter. With s3:// output rank 0 writes them into its own node's staging folder, which
        # this driver may not see: then Ray forwards the workers' output.
        forward = verbose or is_remote(job)
        ray.init(
            address=address,
            runtime_env={"env_vars": env},
            log_to_driver=forward,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
        _forwarding = forward
    else:
        # The raylet warns ("N PYTHON worker processes have been started ... 4x the maximum expected
        # startup concurrency") once a job has started 4x as many workers as the machine's physical
        # cores, which a 2-core machine reaches at once with Ray Data's fractional-CPU tasks, the
        # embedding actors and Train's own actors. Its startup concurrency is the cluster's logical CPUs.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(job.cluster.local_num_cpus))
        for attempt in range(2):  # the free port can be taken before the dashboard binds it: once more
            port = free_port()
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
            try:
                ray.init(
                    num_cpus=job.cluster.local_num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    object_store_memory=job.cluster.object_store_memory_mb * 1024 * 1024,
                    runtime_env={"env_vars": {**WORKER_ENV, API_SERVER_ENV: os.environ[API_SERVER_ENV]}},
                    # quiet by default: workers' and Ray's output stays in the session's log files;
                    # the driver prints rank 0's lines from the run directory (FollowLines)
                    log_to_driver=verbose,
                    logging_level=logging.INFO if verbose else logging.WARNING,
                )
                break
            except Exception as exc:
                ray.shutdown()
                if attempt or "dashboard" not in str(exc).lower() + repr(exc.__cause__).lower():
                    raise
                log.warning("Ray's dashboard could not bind port %d; starting again on another", port)
        _forwarding = verbose


def _cluster_address_env(address: str) -> dict[str, str]:
    """{"RAY_ADDRESS": <GCS address>} for a GCS address or "auto"; {} for Ray Client (ray://) ones."""
    if "://" in address:
        return {}
    from ray._private import services

    try:
        return {"RAY_ADDRESS": services.canonicalize_bootstrap_address_or_die(address)}
    except Exception:  # ray.init reports an unreachable address itself
        return {}


def encode_conditions(job: JobConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Null (CFG) condition and validation prompts, encoded once on the driver, shipped as arrays."""
    enc = open_text_encoder(job.model.text_encoder_spec, job.data.text_max_length)
    null = {k: v.numpy() for k, v in enc.null_condition().items()}
    prompts = None
    if job.eval.prompts:
        prompts = {k: v.numpy() for k, v in enc.encode(job.eval.prompts).items()}
    return null, prompts


def run_job_file(
    path: str | Path, overrides: Iterable[str] = (), address: str | None = None, fresh: bool = False
) -> JobResult:
    job = load_job(path, overrides)  # an invalid file fails here, before anything starts
    return run_job(job, address=address, fresh=fresh, source=str(path))


def check_resume_layout(job: JobConfig, run_dir: Path) -> str | None:
    """A rerun resumes the run's newest checkpoint: when another number of workers or ZeRO stage wrote
    it, convert it once to DeepSpeed's universal format (before Ray starts; `train/relayout.py`), which
    any layout loads. The converted checkpoint's path, None when nothing needed converting; a
    checkpoint that cannot be converted is one line naming the fields."""
    world = job.cluster.num_workers
    run_uri = remote_run_uri(job) or str(run_dir)
    try:
        return prepare(
            newest_layout(run_uri, job.output.s3_endpoint),
            run_uri,
            job.output.s3_endpoint,
            world,
            zero_stage_for(job.deepspeed, world),
            TAG,
        )
    except RelayoutError as exc:
        raise ConfigError(
            f"cluster.num_workers / deepspeed.zero_stage: {exc}; resume with the run's own layout, or "
            f"rerun with --fresh (deletes the run) or another name"
        ) from None


def prepare_run(job: JobConfig, fresh: bool = False) -> Path:
    """Create the run directory (holding job.json) of a resolved job (`ResolvedJob.job`: its local
    paths absolute); `fresh` deletes the run's earlier directory (and its s3:// checkpoints) first."""
    run_dir = run_dir_of(job)
    if fresh:  # only ever <output.dir>/<name>, proven to be one run directory (twinflow.train.paths)
        remove_run_dir(run_dir.parent, job.name)
    if fresh and is_remote(job):
        uri = check_remote_run(remote_run_uri(job))
        if exists(uri, job.output.s3_endpoint):
            delete_dir(uri, job.output.s3_endpoint)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "job.json", job.model_dump_json(indent=2, by_alias=True))
    return run_dir


def build_trainer(
    resolved: ResolvedJob, run_dir: Path, *, callbacks: list | None = None, fault_at_step: int | None = None
):
    """The TorchTrainer for one resolved job (Ray must be initialised). Also used by Tune, one per
    trial. The data stream starts from the manifest the driver read when resolving the job.
    `fault_at_step` is the tests' fault injection (a worker dies for real once at that step)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    job = resolved.job
    null_cond, eval_cond = encode_conditions(job)
    # The worker prints its own progress line; Ray Data's per-operator bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # makes the split's bad-record counter (twinflow.data.tracking)
    train_data = build_train_dataset(job.data, resolved.manifest)
    return TorchTrainer(
        train_loop_keeping_traceback,
        train_loop_config={
            "job": job.model_dump(by_alias=True),
            "judge": resolved.judge,  # periodic eval's judge, from the manifest the driver read
            "run_dir": str(run_dir),
            "null_cond": null_cond,
            "eval_cond": eval_cond,
            "driver": driver_info(),
            "checkpoint_root": remote_run_uri(job) or str(run_dir),
            # the counter's handle itself: rank 0 reads it every log step without a by-name lookup
            "bad_records": live_tracker(tracker_name(job.data)),
            "fault_at_step": fault_at_step,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.cluster.num_workers,
            use_gpu=job.cluster.use_gpu,
            resources_per_worker={
                "CPU": job.cluster.cpus_per_worker,
                **({"GPU": job.cluster.gpus_per_worker} if job.cluster.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            **_storage(job, run_dir),
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=[StopOnDeterministicFailure(), *(callbacks or [])],
        ),
        datasets={"train": train_data},
        dataset_config=ingest_config(job),
    )


def ingest_config(job: JobConfig):
    """How Ray Train feeds the workers. `data.shuffle: none` means the stored order, so the stream keeps
    its order (Ray Data reorders finished blocks otherwise): a one-worker run then sees the batches an
    in-process run over the same shards sees (`tests/train/test_loop_engines.py`)."""
    import ray.train

    if job.data.shuffle != "none" or job.data.shuffle_buffer:
        return ray.train.DataConfig()
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options={"train": options})


def run_job(
    job: JobConfig,
    address: str | None = None,
    fresh: bool = False,
    *,
    fault_at_step: int | None = None,
    source: str | None = None,
) -> JobResult:
    """Run one job to its end (or failure) and return its summary. `source`: the job file, named in
    input errors. `fault_at_step`: tests only, a worker process exits for real once at that step (Ray
    Train then restarts the group)."""
    import ray.train

    resolved = resolve_job(job, source)  # once, before Ray starts: a bad input is one line naming the field
    job = resolved.job
    run_dir = prepare_run(job, fresh)
    check_resume_layout(job, run_dir)
    ensure_ray(job, address)
    log.info("job %s: %s", job.name, batch_line(resolved))
    trainer = build_trainer(resolved, run_dir, fault_at_step=fault_at_step)
    try:
        with follow_run(run_dir):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        errors = write_failure_log(run_dir, exc)
        message = deterministic_message(exc) or str(exc)  # an input error: the worker's one line, not retried
        message += f"\n(full tracebacks: {errors})" if errors else ""
        out = JobResult(
            ok=False, state="ERRORED", run_dir=str(run_dir), error=message, bad_records=_bad_records(job)
        )
        write_summary(run_dir / "summary.json", asdict(out))
        _publish(job, run_dir, out)
        log.error("job %s ERRORED: %s", job.name, message)
        return out

    metrics = dict(result.metrics or {})
    bad = _bad_records(job)
    if bad and "bad" in bad:
        metrics["data/bad_records"] = bad["bad"]
    plot_losses(run_dir / "logs" / "metrics.jsonl", run_dir / "loss.png")
    export = run_dir / "export"
    out = JobResult(
        ok=result.error is None,
        state="FINISHED" if result.error is None else "ERRORED",
        run_dir=str(run_dir),
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        export_dir=str(export) if export.exists() else None,
        error=str(result.error) if result.error else None,
        bad_records=bad,
    )
    write_summary(run_dir / "summary.json", asdict(out))
    _publish(job, run_dir, out)
    print_summary(job, out)
    return out


def batch_line(resolved: ResolvedJob) -> str:
    """The global batch and, for TwinFlow, its rows per group, as every optimizer step takes them."""
    split = resolved.group_split
    groups = f" ({', '.join(f'{k} {v}' for k, v in split.items())})" if split else ""
    return f"global batch {resolved.global_batch} rows per step{groups}"


def follow_run(run_dir: Path):
    """Print rank 0's lines (progress, restores) from the run directory while the job runs, unless
    Ray already forwards the workers' output here (then they would show twice)."""
    logs = run_dir / "logs"
    paths = [logs / "progress.log", logs / "checkpoints.log"]
    if _forwarding:
        return contextlib.nullcontext()
    return FollowLines(paths, log.info, strip_stamp=(logs / "checkpoints.log",))


def _bad_records(job: JobConfig) -> dict[str, Any] | None:
    """The streamed split's bad-record summary (counts per reason and shard), None when unavailable."""
    try:
        return bad_record_report(job.data)
    except (
        Exception
    ) as exc:  # the counter actor is gone (e.g. Ray shut down): say so, do not fail the summary
        return {"error": f"bad-record counts unavailable: {type(exc).__name__}: {exc}"}


def _publish(job: JobConfig, run_dir: Path, out: JobResult) -> None:
    """s3:// output: upload the staged logs, samples, plots and export beside the checkpoints."""
    uri = remote_run_uri(job)
    if uri is None:
        return
    n = upload_dir(run_dir, uri, job.output.s3_endpoint)
    out.remote_dir = uri
    if out.export_dir:
        out.export_dir = uri + "/export"
    log.info("uploaded %d files to %s", n, uri)


def print_summary(job: JobConfig, out: JobResult) -> None:
    run = Path(out.run_dir)
    lines = [f"[twinflow] job {job.name} {out.state} at step {out.steps}/{job.train.steps}"]
    loss = out.metrics.get("total")
    if loss is not None:
        lines.append(f"  final loss      {loss:.4f}")
    for label, path in [
        ("export", out.export_dir),
        ("metrics", run / "logs" / "metrics.jsonl"),
        ("tensorboard", run / "tensorboard"),
        ("loss plot", run / "loss.png"),
        ("samples", run / "samples"),
    ]:
        if path and Path(path).exists():
            lines.append(f"  {label:<15} {path}")
    print("\n".join(lines), flush=True)
