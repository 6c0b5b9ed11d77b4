"""The averages on the training module itself (`twinflow.train.averages`), in one process: a LoRA EMA
kept as a second adapter equals a full-copy EMA of the same model, a full fine-tune's EMA equals it
too, teacher calls leave the online model (and its pending backward) untouched, checkpoints restore at
another world size, and exports from the sampling EMA keep their format."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from twinflow.method.ema import EMA
from twinflow.models.config import LoraSettings, ModelConfig
from twinflow.models.generator import build_generator
from twinflow.models.lora import apply_lora
from twinflow.train import averages as avg

STEPS = 20
DECAY = 0.9  # low, so 20 steps move the average far from both the start and the online weights


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generator(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    g = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", e2_init="random"))
    if lora:
        apply_lora(g, LoraSettings(rank=4))
    return g


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 28, 28, generator=gen)
    t = torch.rand(4, generator=gen)
    r = t * 0.5
    cond = {
        "text_states": torch.randn(4, 8, 384, generator=gen),
        "text_mask": torch.ones(4, 8, dtype=torch.long),
    }
    return x, t, r, cond


def _train(g, steps, on_step):
    """AdamW steps at a large lr (every trainable weight moves) with `on_step` after each."""
    opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=3e-2)
    for i in range(steps):
        x, t, r, cond = _batch(i)
        opt.zero_grad()
        g(x, t, r, cond).square().mean().backward()
        opt.step()
        on_step()


@pytest.mark.parametrize("lora", [True, False], ids=["lora-adapter", "full-sharded"])
def test_the_average_equals_a_full_copy_ema_over_20_steps(lora):
    g = _generator(lora)
    averages = avg.build(g, teacher_mode="ema", teacher_decay=DECAY, sample_decay=None)
    kept = averages.teacher.average
    assert isinstance(kept, avg.AdapterAverage if lora else avg.ShardedAverage)
    reference = EMA(g, DECAY)  # the full deep copy the averages replace
    start = {n: p.detach().clone() for n, p in g.named_parameters() if p.requires_grad}

    def both():
        averages.update_teacher()
        reference.update(g)

    _train(g, STEPS, both)
    ref = dict(reference.module.named_parameters())
    got = kept.full()
    assert sorted(got) == sorted(start)  # every trainable weight is averaged, nothing else
    for name, value in got.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref[name].detach().float(), atol=1e-6, rtol=0)
    moved = [n for n in got if not torch.allclose(got[n], start[n], atol=1e-4)]
    assert len(moved) > len(got) // 2  # the test compares averages that moved, not the start
    assert kept.decay == pytest.approx(reference.current_decay)

    # the teacher answers with the averaged weights, and the online model is untouched afterwards
    x, t, r, cond = _batch(99)
    online = {n: p.detach().clone() for n, p in g.named_parameters()}
    with torch.no_grad():
        want = reference.module(x, t, r, cond)
        plain = g(x, t, r, cond)
    got_out = averages.teacher(x, t, r, cond)
    torch.testing.assert_close(got_out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_out, plain, atol=1e-4)
    assert all(torch.equal(p, online[n]) for n, p in g.named_parameters())
    if lora:  # no average is a whole copy of the generator: the adapter's weights and E2/text_proj
        adapter = sum(e.numel() for e, _ in kept.pairs)
        lora_params = sum(
            p.numel() for n, p in g.named_parameters() if ".lora_A.default" in n or ".lora_B.default" in n
        )
        assert adapter == lora_params
        assert all(e.dtype == torch.float32 and not e.requires_grad for e, _ in kept.pairs)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-adapter", "full-sharded"])
def test_a_teacher_call_between_forward_and_backward_leaves_the_gradient_unchanged(lora):
    """The objective calls the teacher after the online forward, before backward: the swap goes through
    `.data`, so autograd's saved weights are the online ones again when backward runs."""
    g = _generator(lora)
    averages = avg.build(g, teacher_mode="ema", teacher_decay=DECAY, sample_decay=None)
    _train(g, 3, averages.update_teacher)
    x, t, r, cond = _batch(5)
    params = [p for p in g.parameters() if p.requires_grad]

    def grads(with_teacher):
        for p in params:
            p.grad = None
        loss = g(x, t, r, cond).square().mean()
        if with_teacher:
            averages.teacher(x, t, t, cond)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else None for p in params]

    without, with_teacher = grads(False), grads(True)
    assert sum(a is not None for a in without) > len(params) // 2
    for a, b in zip(without, with_teacher):
        assert (a is None and b is None) or torch.equal(a, b)


def test_the_second_adapters_are_fp32_buffers_and_leave_the_trained_set_alone():
    """DeepSpeed sees only the trained model's parameters: the averages' adapters are non-persistent
    fp32 buffers (no ZeRO partitioning, no bf16 cast, not in DeepSpeed's or the export's state dict)."""
    g = _generator(True)
    flags = {n: p.requires_grad for n, p in g.named_parameters()}
    keys = set(g.state_dict())
    averages = avg.build(g, teacher_mode="ema", teacher_decay=DECAY, sample_decay=0.95)
    assert {n: p.requires_grad for n, p in g.named_parameters()} == flags
    assert set(g.state_dict()) == keys
    added = [(n, b) for n, b in g.named_buffers() if avg.TEACHER_ADAPTER in n or avg.SAMPLING_ADAPTER in n]
    assert len(added) == 2 * len(averages.teacher.average.pairs)
    assert all(b.dtype == torch.float32 for _, b in added)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in g.modules() if isinstance(m, BaseTunerLayer)]
    assert {m.active_adapter for m in layers} == {"default"}
    with averages.teacher.average.active():
        assert {m.active_adapter for m in layers} == {avg.TEACHER_ADAPTER}
    assert {m.active_adapter for m in layers} == {"default"}


@pytest.mark.parametrize("lora", [True, False], ids=["lora-adapter", "full-sharded"])
def test_checkpoint_roundtrip_and_a_checkpoint_of_two_ranks_loads_on_one(tmp_path, lora):
    g = _generator(lora)
    averages = avg.build(g, teacher_mode="ema", teacher_decay=DECAY, sample_decay=0.95)
    _train(g, 4, lambda: (averages.update_teacher(), averages.update_sampling()))
    want_teacher, want_sampling = averages.teacher.average.full(), averages.sample_ema.full()
    (tmp_path / "same").mkdir()
    averages.save(tmp_path / "same")

    fresh = avg.build(_generator(lora), teacher_mode="ema", teacher_decay=DECAY, sample_decay=0.95)
    assert fresh.load(tmp_path / "same")
    for kept, want in ((fresh.teacher.average, want_teacher), (fresh.sample_ema, want_sampling)):
        assert kept.decay == pytest.approx(
            averages.teacher.average.decay if kept is fresh.teacher.average else averages.sample_ema.decay
        )
        for n, v in kept.full().items():
            assert torch.equal(v, want[n]), n

    # the files two ranks would write (each its padded half of every flat weight), loaded at world 1
    state = averages.state_dict()
    two = tmp_path / "two"
    two.mkdir()
    for rank in (0, 1):
        halves = copy.deepcopy(state)
        for part in ("teacher", "sample_ema"):
            sharded = halves[part]["side"] if lora else halves[part]
            sharded["world"] = 2
            for n, s in sharded["shards"].items():
                start, stop, size = avg._slice(s.numel(), rank, 2)
                piece = torch.zeros(size)
                piece[: stop - start] = s[start:stop]
                sharded["shards"][n] = piece
        torch.save(halves, two / avg.FILE_PATTERN.format(rank=rank))
    other = avg.build(_generator(lora), teacher_mode="ema", teacher_decay=DECAY, sample_decay=0.95)
    assert other.load(two)
    for n, v in other.teacher.average.full().items():
        assert torch.equal(v, want_teacher[n]), n
    with pytest.raises(ValueError, match="teacher mode"):
        avg.build(_generator(lora), teacher_mode="online", teacher_decay=DECAY, sample_decay=0.95).load(
            tmp_path / "same"
        )


def test_an_export_from_the_lora_sampling_ema_keeps_its_format(tmp_path):
    from safetensors.torch import load_file

    from twinflow.models.export_writer import save_generator

    g = _generator(True)
    save_generator(g, tmp_path / "plain")  # a LoRA model without averages: the format to keep
    averages = avg.build(g, teacher_mode="ema", teacher_decay=DECAY, sample_decay=0.9)
    _train(g, 5, lambda: (averages.update_teacher(), averages.update_sampling()))
    online = {n: p.detach().clone() for n, p in g.named_parameters()}
    with averages.sampling() as module:
        save_generator(module, tmp_path / "ema")
    assert all(torch.equal(p, online[n]) for n, p in g.named_parameters())  # swapped back

    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    assert files(tmp_path / "ema") == files(tmp_path / "plain")
    plain_meta = json.loads((tmp_path / "plain" / "twinflow.json").read_text())
    ema_meta = json.loads((tmp_path / "ema" / "twinflow.json").read_text())
    assert plain_meta == ema_meta
    adapter = load_file(str(tmp_path / "ema" / "lora" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(
        load_file(str(tmp_path / "plain" / "lora" / "adapter_model.safetensors"))
    )
    # the exported adapter is the sampling EMA, not the online adapter
    full = averages.sample_ema.full()
    name = next(n for n in full if n.endswith("to_q.lora_B.default.weight"))
    key = next(k for k in adapter if k.endswith(name.removeprefix("backbone.").replace(".default", "")))
    torch.testing.assert_close(adapter[key], full[name])
    assert not torch.allclose(adapter[key], online[name])


def test_a_frozen_teacher_without_lora_answers_with_the_initial_weights():
    g = _generator(False)
    x, t, r, cond = _batch(7)
    with torch.no_grad():
        initial = g(x, t, r, cond)
    averages = avg.build(g, teacher_mode="frozen", teacher_decay=DECAY, sample_decay=None)
    assert averages.teacher.decay == 1.0 and not averages.teacher.is_online
    _train(g, 3, averages.update_teacher)  # updates leave a frozen teacher as it was
    with torch.no_grad():
        trained = g(x, t, r, cond)
    assert not torch.allclose(trained, initial, atol=1e-4)
    assert torch.equal(averages.teacher(x, t, r, cond), initial)
