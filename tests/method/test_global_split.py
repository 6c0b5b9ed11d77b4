"""lambda is realised over the optimizer step's global batch (ranks x micro-batch x accumulation).

The per-micro-batch split made lambda a no-op at the micro-batches large models train with: at 4 rows
every lambda from 0.15 to 0.75 was (1, 1, 1, 1). These tests hold the global split to what it claims.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twinflow.config import ConfigError
from twinflow.method import Teacher, TwinFlowConfig, TwinFlowObjective
from twinflow.method.conditioning import take_cond
from twinflow.method.groups import GROUP_NAMES, BatchLayout, deal_rows, global_split, realises
from twinflow.method.toy import ToyVelocityMLP
from twinflow.method.twinflow import Draws
from twinflow.train.config import load_job
from twinflow.tune.config import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def slot_rows(split, layout: BatchLayout, offset: int):
    """For each slot, (its global row indices in group order, its ADV-local rows, its E2E-local rows)
    under the dealing rule of `deal_rows` (global row i -> slot (i + offset) mod slots)."""
    starts = [sum(split.sizes[:g]) for g in range(4)]
    out = []
    for k in range(layout.slots):
        rows = [i for i in range(split.batch_size) if (i + offset) % layout.slots == k]
        group = [max(g for g in range(4) if i >= starts[g] and split.sizes[g]) for i in rows]
        rows = [i for _, i in sorted(zip(group, rows))]  # already group-ordered; kept explicit
        adv = [i - starts[3] for i in rows if i >= starts[3] and split.sizes[3]]
        e2e = [i for i in rows if i < split.sizes[0]]
        out.append(
            (torch.tensor(rows), torch.tensor(adv, dtype=torch.long), torch.tensor(e2e, dtype=torch.long))
        )
    return out


@pytest.mark.parametrize("teacher_mode", ["online", "ema"])
def test_two_ranks_with_accumulation_give_the_global_batch_gradient(teacher_mode):
    """2 ranks x micro-batch 4 x accumulation 2: the mean of the 4 micro-batches' gradients (what
    accumulation and the all-reduce compute) equals one process computing the 16 rows at once with the
    same split and the same random values. Tolerance 1e-5 relative to the largest gradient entry: the
    two differ only in float32 summation order (batched matmuls of 4 vs 16 rows, a sum of four partial
    gradients), which the Barron loss's 1/c = 1000 scaling of each row's residual amplifies to ~3e-6.
    A rectify term averaged per micro-batch (instead of kappa * 4 / global rows per E2E row) misses it
    by far more (checked)."""
    torch.manual_seed(0)
    layout = BatchLayout(ranks=2, micro_batch=4, accumulation=2)
    cfg = TwinFlowConfig(**{"lambda": 1 / 3, "teacher": teacher_mode, "enhanced_ratio": 0.5})
    obj = TwinFlowObjective(cfg)
    model = ToyVelocityMLP(num_classes=4)
    teacher = Teacher(model, teacher_mode, decay=0.9)
    teacher.update()
    G = layout.global_rows
    x0 = torch.randn(G, 2)
    cond = {"label": torch.randint(0, 4, (G,))}
    null = model.null_cond()
    split = obj.split(G)
    assert split.sizes == global_split(G, lambda_=1 / 3).sizes == (3, 6, 5, 2)
    draws = Draws.draw(split, (2,), rectify=True, device="cpu", generator=torch.Generator().manual_seed(5))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(
        obj(model, x0, cond, teacher=teacher, null_cond=null, update_teacher=False, draws=draws).loss
    )

    step, seed = 3, 0
    offset = (seed + step) % layout.slots
    parts = slot_rows(split, layout, offset)
    total = [torch.zeros_like(g) for g in whole]
    seen = [0, 0, 0, 0]
    for rank in range(layout.ranks):
        for micro in range(layout.accumulation):
            k = layout.slot(rank, micro)
            part = obj.slot_split(layout, step, rank, micro, seed)
            rows, adv, e2e = parts[k]
            assert part.batch_size == layout.micro_batch
            seen = [a + b for a, b in zip(seen, part.sizes)]
            out = obj(
                model,
                x0[rows],
                take_cond(cond, rows),
                teacher=teacher,
                null_cond=null,
                update_teacher=False,
                split=part,
                draws=draws.take(rows, adv, e2e),
            )
            for acc, g in zip(total, grads(out.loss / layout.slots)):
                acc += g
    assert tuple(seen) == split.sizes  # the slots together hold exactly the global split
    scale = max(g.abs().max().item() for g in whole)
    for a, b in zip(total, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)


def test_dealing_gives_every_slot_its_rows_and_rotates_with_the_step():
    layout = BatchLayout(ranks=8, micro_batch=4, accumulation=2)
    split = global_split(layout.global_rows, lambda_=1 / 3)
    for offset in range(layout.slots):
        dealt = deal_rows(split, layout, offset)
        assert all(p.batch_size == 4 for p in dealt)
        assert tuple(map(sum, zip(*(p.sizes for p in dealt)))) == split.sizes
        for g in range(4):  # as even as it can be
            sizes = [p.sizes[g] for p in dealt]
            assert max(sizes) - min(sizes) <= 1
    # over as many steps as there are slots, every slot carries each group's remainder equally often
    obj = TwinFlowObjective(TwinFlowConfig(**{"lambda": 1 / 3}))
    per_slot = [[0] * 4 for _ in range(layout.slots)]
    for step in range(layout.slots):
        for rank in range(layout.ranks):
            for micro in range(layout.accumulation):
                sizes = obj.slot_split(layout, step, rank, micro).sizes
                for g in range(4):
                    per_slot[layout.slot(rank, micro)][g] += sizes[g]
    assert all(row == [x * 1 for x in per_slot[0]] for row in per_slot)


def realised_per_step(lam: float, layout: BatchLayout) -> tuple[int, ...]:
    """What one optimizer step trains: the rows of each group summed over every rank and micro-batch."""
    obj = TwinFlowObjective(TwinFlowConfig(**{"lambda": lam}))
    sizes = [
        obj.slot_split(layout, 0, rank, m).sizes
        for rank in range(layout.ranks)
        for m in range(layout.accumulation)
    ]
    return tuple(map(sum, zip(*sizes)))


def test_every_lambda_of_the_qwen_sweep_trains_a_distinct_split_at_its_real_shape():
    """tune/qwen_image_lambda_nfe.yaml: 8 ranks x micro-batch 4 x accumulation 2 (computed, not run).
    The per-micro-batch split trained (1, 1, 1, 1) x 16 for every lambda from 0.17 to 0.67."""
    sweep = load_sweep(ROOT / "tune" / "qwen_image_lambda_nfe.yaml", cwd=ROOT)
    job = sweep.base_job()
    layout = BatchLayout(
        job.cluster.num_workers, job.train.micro_batch, job.deepspeed.gradient_accumulation_steps
    )
    assert (layout.ranks, layout.micro_batch, layout.accumulation) == (8, 4, 2)
    lambdas = sweep.config.search_space["method.lambda"].grid
    splits = {lam: realised_per_step(lam, layout) for lam in lambdas}
    assert len(set(splits.values())) == len(lambdas), splits
    for lam, sizes in splits.items():
        twin = sizes[0] + sizes[3]
        assert abs(twin - lam * layout.global_rows) <= 1, (lam, sizes)
        if 0 < lam < 1:
            assert min(sizes) >= 1


def test_the_shipped_recipe_trains_the_lambda_it_says():
    job = load_job(ROOT / "jobs" / "qwen_image_lora.yaml")
    layout = BatchLayout(
        job.cluster.num_workers, job.train.micro_batch, job.deepspeed.gradient_accumulation_steps
    )
    sizes = realised_per_step(job.method.lambda_, layout)
    assert abs((sizes[0] + sizes[3]) / layout.global_rows - job.method.lambda_) <= 1 / layout.global_rows


def test_a_batch_too_small_for_lambda_is_refused_before_anything_runs():
    job = ROOT / "jobs" / "fashion_twinflow.yaml"
    args = ["cluster.num_workers=1", "train.micro_batch=4", "method.lambda=0.15"]
    with pytest.raises(ConfigError) as err:
        load_job(job, args)
    text = str(err.value)
    for field in (
        "method.lambda",
        "train.micro_batch",
        "deepspeed.gradient_accumulation_steps",
        "cluster.num_workers",
    ):
        assert field in text
    assert "at least 7 rows" in text and "fashion_twinflow.yaml" in text
    load_job(job, args + ["deepspeed.gradient_accumulation_steps=2"])  # 8 rows hold 0.15


def test_a_sweep_whose_lambdas_collapse_is_refused(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text((ROOT / "tune" / "fashion_lambda_nfe.yaml").read_text() + "\n# collapse test\n")
    text = sweep.read_text()
    assert "method.lambda" in text
    with pytest.raises(ConfigError) as err:
        load_sweep(
            sweep,
            ["search_space={method.lambda: {grid: [0.15, 0.2, 0.5]}}"],
            cwd=ROOT,
            job_overrides=["cluster.num_workers=1", "train.micro_batch=8"],
        )
    assert "0.15 and 0.2 both give the group split" in str(err.value)
    assert "global batch of 8 rows" in str(err.value)


def test_realises_is_within_one_row():
    for rows in range(4, 200):
        for lam in (0.1, 0.17, 0.25, 1 / 3, 0.5, 0.67, 0.9):
            split = global_split(rows, lambda_=lam)
            ok = realises(split, lambda_=lam)
            assert ok == (abs(split.size("e2e") + split.size("adv") - lam * rows) <= 1)
            if lam * rows >= 2 and (1 - lam) * rows >= 2:
                assert ok  # whenever each non-empty group can have a row, lambda is met
    assert GROUP_NAMES == ("e2e", "mul", "any", "adv")


@pytest.mark.parametrize("teacher_mode", ["online", "ema", "frozen"])
def test_ranks_make_the_same_calls_whatever_rows_they_hold(teacher_mode):
    """With the global split, one rank's micro-batch may hold no ADV or E2E rows; under ZeRO-3 every
    forward gathers weights across ranks, so each rank must still make every call (`lockstep`): a call
    with no rows of its own runs on one padding row. Its loss and gradients are those without padding."""
    torch.manual_seed(1)
    layout = BatchLayout(ranks=4, micro_batch=4, accumulation=1)
    obj = TwinFlowObjective(
        TwinFlowConfig(**{"lambda": 0.25, "teacher": teacher_mode, "enhanced_ratio": 0.5})
    )
    model = ToyVelocityMLP(num_classes=4)
    teacher = Teacher(model, teacher_mode, decay=0.9)
    teacher.update()
    sizes, calls = set(), set()
    for step in range(4):
        for rank in range(layout.ranks):
            part = obj.slot_split(layout, step, rank, 0)
            sizes.add(part.sizes)
            x0, cond = torch.randn(4, 2), {"label": torch.randint(0, 4, (4,))}

            def run(lockstep, x0=x0, cond=cond, part=part, step=step):
                model.zero_grad(set_to_none=True)
                out = obj(
                    model,
                    x0,
                    cond,
                    teacher=teacher,
                    null_cond=model.null_cond(),
                    update_teacher=False,
                    split=part,
                    generator=torch.Generator().manual_seed(step),
                    lockstep=lockstep,
                )
                out.loss.backward()
                return out, [p.grad.clone() for p in model.parameters()]

            padded, g_pad = run(True)
            plain, g_plain = run(False)
            calls.add(padded.model_calls)
            assert padded.loss.item() == plain.loss.item()
            assert all(torch.equal(a, b) for a, b in zip(g_pad, g_plain))
    assert len(sizes) > 1  # the ranks really held different groups (some without E2E or ADV rows)
    assert len(calls) == 1, calls  # and still made the same number of calls
