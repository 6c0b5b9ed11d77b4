"""`twinflow plan`'s printed report says what the planner computed: every figure of every layout row
in GiB to one decimal, the usable capacity, the model and step lines, the fits column, and the
verdict line (the planner's own figures are tested in test_plan.py; this checks their printing)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from twinflow.cli import main
from twinflow.plan.cli import _COLUMNS, render
from twinflow.plan.gpus import GIB, parse_size
from twinflow.plan.planner import plan
from twinflow.train.config import load_job

SHIPPED_JOB = "jobs/qwen_image_lora.yaml"


def _sets(tmp_path: Path) -> list[str]:
    empty = tmp_path / "Qwen-Image"  # no model files: the shipped published configs
    empty.mkdir()
    return [f"model.pretrained_path={empty}", f"model.vae_path={empty}"]


def _report(capsys, sets: list[str], *gpu: str) -> tuple[int, list[str]]:
    code = main(["plan", SHIPPED_JOB, *gpu, *(a for s in sets for a in ("--set", s))])
    return code, capsys.readouterr().out.splitlines()


def _row_figures(line: str, label: str) -> tuple[list[str], str]:
    cells = line[len(label) :].split()
    return cells[:-1], cells[-1]


def test_every_row_prints_the_planners_figures_in_gib(tmp_path, capsys):
    sets = [*_sets(tmp_path), "train.micro_batch=8"]  # --set reaches the plan (the file says 4)
    code, lines = _report(capsys, sets, "--gpu-mem", "48GiB", "--gpus", "4")  # some layouts fit, some not
    result = plan(load_job(SHIPPED_JOB, overrides=sets), parse_size("48GiB"), 4, parse_size("2GiB"))
    assert code == 0
    c, w = result.work.counts, result.work
    assert lines[0] == (
        f"model: {c.total:,} parameters ({c.trainable:,} trainable), {c.layers} blocks x {c.width} "
        f"({c.heads} heads), largest block {c.largest_layer:,}"
    )
    assert w.micro_batch == 8
    assert lines[1].startswith(
        f"step: micro-batch {w.micro_batch}, {w.tokens} tokens/row, forward with gradient {w.grad_rows} rows, "
        f"largest no-grad forward {w.nograd_rows} rows (and {w.overlap_rows} while its activations are held), "
        f"{w.emas} fp32 average(s) (second adapter + 1/world of E2), precision {w.precision}"
    )
    gpu_line = next(line for line in lines if line.startswith("GPU: "))
    assert f"usable {result.capacity / GIB:.1f} GiB after the reserve" in gpu_line
    assert gpu_line.startswith("GPU: 48GiB, usable 46.0 GiB")  # less the 2 GiB reserve
    header = next(line for line in lines if line.startswith("layout"))
    assert header.split() == ["layout", *(h[:8] for h in _COLUMNS), "total", "startup", "host", "fits"]

    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == len(result.table) + 1  # every layout, then the cheapest again under the verdict
    big = 0
    for e, line in zip(result.table, rows):
        label = e.layout.label()
        assert line.startswith(label)
        figures, fits = _row_figures(line, label)
        values = [getattr(e, k) for k in _COLUMNS] + [e.training, e.startup, e.cpu]
        assert figures == [f"{v / GIB:.1f}" for v in values], label
        assert fits == ("yes" if e.peak <= result.capacity else "NO"), label
        big += any(v > GIB for v in values)
    assert big == len(rows) - 1  # a 20B model: every row has figures of whole GiB, not rounded to 0.0
    assert {"yes", "NO"} <= {_row_figures(r, e.layout.label())[1] for e, r in zip(result.table, rows)}
    at = lines.index(f"cheapest layout that fits: {result.cheapest.layout.label()}")
    assert lines[at + 1] == rows[-1] and rows[-1].startswith(result.cheapest.layout.label())


def test_a_gpu_nothing_fits_on_says_why_and_exits_3(tmp_path, capsys):
    sets = _sets(tmp_path)
    code, lines = _report(capsys, sets, "--gpu-mem", "4GiB", "--gpus", "4")
    result = plan(load_job(SHIPPED_JOB, overrides=sets), parse_size("4GiB"), 4, parse_size("2GiB"))
    assert code == 3 and result.cheapest is None
    assert all(line.endswith("  NO") for line in lines if line[:1].isdigit())
    assert not any(e.training <= result.capacity < e.startup for e in result.table)
    assert any(
        line == "no layout up to 128 GPUs fits: lower micro_batch or resolution, use LoRA, or a larger GPU"
        for line in lines
    )


def _startup_bound(result, capacity: int):
    """`result` with every layout's startup one byte over `capacity` (training unchanged): the shipped
    recipes never start bigger than they train now that ZeRO-3 builds partitioned, so the startup
    verdict is reached through the table."""
    table = [replace(e, startup=capacity + 1) for e in result.table]
    return replace(result, capacity=capacity, table=table, cheapest=None)


def test_the_startup_verdict_when_only_the_startup_peak_is_over(tmp_path):
    result = plan(
        load_job(SHIPPED_JOB, overrides=_sets(tmp_path)), parse_size("1000GiB"), 4, parse_size("2GiB")
    )
    least = min(e.training for e in result.table)
    lines = render(_startup_bound(result, least), "test").splitlines()  # training equal to usable: it fits
    assert lines[-1] == (
        "no layout fits because of the startup peak: below ZeRO-3 the worker builds the whole "
        "generator (in the training precision) on each GPU before DeepSpeed shards it (startup "
        "column; ZeRO-3 builds it partitioned); training itself would fit"
    )
    assert all(line.endswith("  NO") for line in lines if line[:1].isdigit())
    lines = render(_startup_bound(result, least - 1), "test").splitlines()  # a byte under: training too
    assert lines[-1].startswith("no layout up to 128 GPUs fits")


def test_a_full_fine_tune_says_where_its_ema_lives_and_a_twinflow_job_its_group_split(tmp_path, capsys):
    from twinflow.train.modelling import realised_split

    sets = [*_sets(tmp_path), "model.lora=null"]
    _, lines = _report(capsys, sets, "--gpu", "h200-141g")
    assert "fp32 average(s) (1/world per rank)" in lines[1]
    blanks = [i for i, line in enumerate(lines) if line == ""]
    header = next(i for i, line in enumerate(lines) if line.startswith("layout"))
    rows = next(i for i in range(header + 1, len(lines)) if not lines[i][:1].isdigit()) - header - 1
    assert rows == 8  # every stage/offload layout
    assert blanks == [header - 1, header + rows + 1]  # one blank line before the table, one after it

    job = load_job("jobs/mnist_twinflow.yaml")
    found = realised_split(job)
    split = dict(found["group_split"])
    assert main(["plan", "jobs/mnist_twinflow.yaml", "--gpus", "2"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    rows = split.pop("global_batch")
    assert last == (
        f"TwinFlow groups per optimizer step ({rows} rows = {job.cluster.num_workers} workers x "
        f"{job.train.micro_batch} x {job.deepspeed.gradient_accumulation_steps} accumulation): "
        + ", ".join(f"{k} {v}" for k, v in split.items())
        + f"; lambda {job.method.lambda_:g} realised as {found['lambda_realised']:.3f}"
    )
    assert job.method.lambda_ > 0 and rows == sum(split.values())


def test_a_layout_whose_figure_equals_the_usable_memory_to_the_byte_fits(tmp_path, capsys):
    """The boundary: a peak equal to the usable bytes fits, one byte more does not (the startup
    verdict's boundary is in test_the_startup_verdict_when_only_the_startup_peak_is_over)."""
    sets = _sets(tmp_path)
    job, reserve = load_job(SHIPPED_JOB, overrides=sets), parse_size("2GiB")
    table = plan(job, parse_size("1000GiB"), 4, reserve).table
    smallest = min(table, key=lambda e: e.peak)
    code, lines = _report(capsys, sets, "--gpu-mem", f"{smallest.peak + reserve}B", "--gpus", "4")
    assert code == 0
    row = next(line for line in lines if line.startswith(smallest.layout.label()))
    assert row.endswith("  yes")
    code, lines = _report(capsys, sets, "--gpu-mem", f"{smallest.peak + reserve - 1}B", "--gpus", "4")
    assert code == 3  # a byte less: the smallest layout no longer fits, nor any other


@pytest.mark.parametrize("error", [FileNotFoundError("no config.json in /x"), ValueError("batch too small")])
def test_a_planner_error_is_one_line_naming_the_job_and_exit_code_2(tmp_path, capsys, monkeypatch, error):
    import twinflow.plan.planner as planner

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(planner, "plan", fail)
    code = main(["plan", SHIPPED_JOB, *(a for s in _sets(tmp_path) for a in ("--set", s))])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == f"error: {SHIPPED_JOB}: {error}"
    assert captured.out == ""  # no report after the error
