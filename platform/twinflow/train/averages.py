"""The EMA teacher and the sampling EMA, held where they fit: a LoRA job keeps each as a second fp32
adapter on the same frozen base; a full fine-tune keeps each rank's 1/world partition in fp32 (on the
host when the job offloads), never a whole fp32 copy of the generator per GPU.

Both live on the training module itself and are switched in for the calls that need them: the
teacher's forwards run the online module with the teacher's adapter active (LoRA) or its weights
copied into the module's own storage for the call (full fine-tune: into each rank's ZeRO-3 partition,
which DeepSpeed gathers layer by layer as usual; at ZeRO-0/1/2 the replicated weights are swapped).
The copies go through `.data`, so the version counters autograd checks are untouched: an online
forward's saved tensors see the online values again before its backward.

Warm-up of the decay is `twinflow.method.ema.next_decay` (d_0 = 0: the first update copies).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twinflow.method.ema import TEACHER_MODES, next_decay
from twinflow.models.lora import ADAPTER, disable_adapters, has_lora

#: peft adapter names of the two averages on a LoRA model (beside the trained "default").
TEACHER_ADAPTER = "ema_teacher"
SAMPLING_ADAPTER = "ema_sampling"
#: One file per rank in a checkpoint directory.
FILE_PATTERN = "averages_rank{rank}.pt"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _partitioned(p: Tensor) -> bool:
    """A ZeRO-3 parameter: `ds_tensor` holds this rank's flat partition, `p.data` is empty between uses."""
    return hasattr(p, "ds_tensor")


def _storage(p: Tensor) -> Tensor:
    """The tensor that holds this rank's values of `p` (its ZeRO-3 partition, or the whole weight)."""
    return p.ds_tensor.data if _partitioned(p) else p.data


def _slice(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, padded length) of rank's part of a flat tensor of `numel` elements."""
    size = math.ceil(numel / world)
    start = min(rank * size, numel)
    return start, min(start + size, numel), size


class _Decay:
    """The warmed-up decay schedule shared by every average."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.current = 0.0
        self.num_updates = 0

    def advance(self) -> float:
        """The weight of the online value in this update (1 - d_k), then d_k -> d_{k+1}."""
        weight = 1.0 - self.current
        self.num_updates += 1
        self.current = next_decay(self.current, self.decay)
        return weight

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "current_decay": self.current, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.current = float(state["current_decay"])
        self.num_updates = int(state["num_updates"])


class ShardedAverage:
    """fp32 average of named parameters, each rank keeping its 1/world slice of every flat parameter
    (its ZeRO-3 partition as it is; an even slice of a replicated weight). `decay=None` keeps the
    values of construction (the frozen teacher)."""

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        decay: float | None,
        *,
        release: Callable[[], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.rank, self.world = _world()
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.schedule = _Decay(decay) if decay is not None else None
        self.release = release
        self.shards = [
            self._local(p).detach().to(device=device, dtype=torch.float32, copy=True) for p in self.params
        ]

    def _local(self, p: Tensor) -> Tensor:
        """This rank's flat values of `p`, padded to the common shard length (a view where possible)."""
        if _partitioned(p):
            return p.ds_tensor.data.view(-1)
        start, stop, size = _slice(p.numel(), self.rank, self.world)
        flat = p.data.reshape(-1)[start:stop]
        return flat if stop - start == size else torch.nn.functional.pad(flat, (0, size - (stop - start)))

    @property
    def decay(self) -> float:
        return self.schedule.current if self.schedule is not None else 1.0

    @torch.no_grad()
    def update(self) -> None:
        if self.schedule is None:
            return
        weight = self.schedule.advance()
        src = [self._local(p).to(s.device, torch.float32) for p, s in zip(self.params, self.shards)]
        torch._foreach_lerp_(self.shards, src, weight)

    def _gather(self, shard: Tensor, numel: int, device: torch.device) -> Tensor:
        shard = shard.to(device)
        if self.world == 1:
            return shard[:numel]
        parts = [torch.empty_like(shard) for _ in range(self.world)]
        dist.all_gather(parts, shard)
        return torch.cat(parts)[:numel]

    @torch.no_grad()
    def full(self) -> dict[str, Tensor]:
        """Every parameter's whole fp32 average (on every rank: a collective); for tests and checks."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shards):
            shape = p.ds_shape if _partitioned(p) else p.shape
            out[name] = self._gather(s, math.prod(shape), s.device).view(shape).cpu()
        return out

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module's own storage holds the averaged weights inside the block (every rank enters)."""
        if not self.params:
            yield
            return
        if any(_partitioned(p) for p in self.params) and self.release is not None:
            self.release()  # parameters gathered before now would keep the online values
        saved = []
        with torch.no_grad():
            for p, s in zip(self.params, self.shards):
                if _partitioned(p):
                    local = p.ds_tensor.data.view(-1)
                    saved.append(local.clone())
                    local.copy_(s.to(local.device, local.dtype))
                elif self.world == 1:
                    saved.append(p.data.clone())
                    p.data.copy_(s.view(p.shape))
                else:
                    host = torch.device("cpu") if p.device.type == "cuda" else p.device
                    saved.append(p.data.to(host, copy=True))
                    p.data.copy_(self._gather(s, p.numel(), p.device).view(p.shape))
        try:
            yield
        finally:
            if any(_partitioned(p) for p in self.params) and self.release is not None:
                self.release()
            with torch.no_grad():
                for p, b in zip(self.params, saved):
                    _storage(p).copy_(b.view(_storage(p).shape))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "sharded",
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "world": self.world,
            "shards": {n: s.cpu() for n, s in zip(self.names, self.shards)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["kind"] != "sharded" or sorted(state["shards"]) != sorted(self.names):
            raise ValueError("the checkpoint's averages hold other parameters than this model's")
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        for name, s in zip(self.names, self.shards):
            s.copy_(state["shards"][name])

    def load_resharded(self, states: list[Mapping[str, Any]]) -> None:
        """Load the states every rank of another world size saved (ordered by rank)."""
        if self.schedule is not None:
            self.schedule.load_state_dict(states[0]["schedule"])
        for name, p, s in zip(self.names, self.params, self.shards):
            numel = math.prod(p.ds_shape if _partitioned(p) else p.shape)
            whole = torch.cat([st["shards"][name] for st in states])[:numel]
            start, stop, _ = _slice(numel, self.rank, self.world)
            s.zero_()
            s[: stop - start].copy_(whole[start:stop])


def _adapter_as_buffers(backbone: nn.Module, name: str, device: torch.device | None) -> None:
    """Turn adapter `name`'s weights into fp32 non-persistent buffers: DeepSpeed walks every
    parameter of the module it wraps (ZeRO-3 expects each to be partitioned, the bf16 cast and the
    checkpoint take them all), and the average is neither trained nor DeepSpeed's to keep."""
    for key, module in backbone.named_modules():
        if key.rsplit(".", 1)[-1] != name:
            continue
        for sub in module.modules():
            for pname, p in list(sub.named_parameters(recurse=False)):
                del sub._parameters[pname]
                value = p.detach().to(device=device or p.device, dtype=torch.float32)
                sub.register_buffer(pname, value, persistent=False)
    left = [n for n, _ in backbone.named_parameters() if f".{name}." in f".{n}"]
    if left:
        raise ValueError(f"LoRA average {name!r}: adapter weights outside a layer module ({left[0]})")


def _lora_pairs(backbone: nn.Module, name: str) -> list[tuple[str, Tensor, nn.Parameter]]:
    """(trained parameter's name, average's buffer, trained parameter) for every weight of `name`."""
    params = dict(backbone.named_parameters())
    pairs = []
    for key, b in backbone.named_buffers():
        if f".{name}." in f".{key}":
            online = key.replace(f".{name}.", f".{ADAPTER}.")
            pairs.append((f"backbone.{online}", b, params[online]))
    return pairs


@contextlib.contextmanager
def active_adapter(backbone: nn.Module, name: str) -> Iterator[None]:
    """Every LoRA layer answers with adapter `name` inside the block. Sets peft's active adapter
    attribute directly: peft's own `set_adapter` also flips requires_grad, which the optimizer's
    parameter groups must never see change."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = name
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._active_adapter = b


class AdapterAverage:
    """fp32 average of a LoRA model as a second peft adapter `name` on the same frozen base; the
    trainable parameters outside the adapter (E2, the text projection) as a `ShardedAverage`."""

    def __init__(
        self,
        generator: nn.Module,
        name: str,
        decay: float,
        *,
        release: Callable[[], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        backbone = generator.backbone
        self.generator, self.name = generator, name
        grad_flags = {id(p): p.requires_grad for p in generator.parameters()}
        config = copy.deepcopy(backbone.peft_config[ADAPTER])
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            backbone.add_adapter(config, adapter_name=name)  # diffusers makes it active: undone below
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in backbone.modules():
            if isinstance(m, BaseTunerLayer):
                m._active_adapter = ADAPTER
        for p in generator.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
        _adapter_as_buffers(backbone, name, device)
        named = _lora_pairs(backbone, name)
        if not named:
            raise ValueError(f"LoRA average {name!r}: the model has no {ADAPTER!r} adapter weights")
        self.keys = [k for k, _, _ in named]
        self.pairs = [(b, p) for _, b, p in named]
        self._copy_online()
        self.side = ShardedAverage(
            [(n, p) for n, p in generator.named_parameters() if p.requires_grad and ".lora_" not in f".{n}"],
            decay,
            release=release,
            device=device,
        )
        self.schedule = self.side.schedule

    @contextlib.contextmanager
    def _online_lora(self) -> Iterator[list[Tensor]]:
        """The trained adapter's whole weights (gathered under ZeRO-3: adapter-size)."""
        online = [o for _, o in self.pairs]
        partitioned = [o for o in online if _partitioned(o)]
        if not partitioned:
            yield online
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            yield online

    @torch.no_grad()
    def _copy_online(self) -> None:
        with self._online_lora() as online:
            for (ema, _), o in zip(self.pairs, online):
                ema.data.copy_(o.data)

    @property
    def decay(self) -> float:
        return self.schedule.current

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.schedule.current
        with self._online_lora() as online:
            dst = [e.data for e, _ in self.pairs]
            src = [o.data.to(e.device, torch.float32) for (e, _), o in zip(self.pairs, online)]
            torch._foreach_lerp_(dst, src, weight)
        self.side.update()  # advances the shared schedule

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Forwards inside the block use the average (its adapter, its side weights)."""
        with active_adapter(self.generator.backbone, self.name), self.side.swapped_in():
            yield

    @contextlib.contextmanager
    def copied_into_trained_adapter(self) -> Iterator[None]:
        """The trained adapter's own weights hold the average inside the block, so everything that
        reads the "default" adapter (the export's peft files, merging) sees the average."""
        saved = []
        rank, world = _world()
        with torch.no_grad():
            for ema, online in self.pairs:
                store = _storage(online)
                saved.append(store.clone())
                if _partitioned(online):
                    start, stop, _ = _slice(ema.numel(), rank, world)
                    flat = store.view(-1)
                    flat.zero_()
                    flat[: stop - start].copy_(ema.data.reshape(-1)[start:stop].to(flat.dtype))
                else:
                    store.copy_(ema.data.to(store.dtype))
        try:
            with self.side.swapped_in():
                yield
        finally:
            with torch.no_grad():
                for (_, online), b in zip(self.pairs, saved):
                    _storage(online).copy_(b)

    def full(self) -> dict[str, Tensor]:
        """The average's whole weights keyed like the trained model's parameters."""
        out = {k: e.detach().float().cpu().clone() for k, (e, _) in zip(self.keys, self.pairs)}
        return {**out, **self.side.full()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adapter",
            "adapter": {k: e.detach().cpu().clone() for k, (e, _) in zip(self.keys, self.pairs)},
            "side": self.side.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_adapter(state)
        self.side.load_state_dict(state["side"])

    def load_resharded(self, states: list[Mapping[str, Any]]) -> None:
        self._load_adapter(states[0])
        self.side.load_resharded([s["side"] for s in states])

    def _load_adapter(self, state: Mapping[str, Any]) -> None:
        if state["kind"] != "adapter":
            raise ValueError("the checkpoint's averages are not LoRA adapters; this job trains LoRA")
        have = {k: e for k, (e, _) in zip(self.keys, self.pairs)}
        if sorted(have) != sorted(state["adapter"]):
            raise ValueError("the checkpoint's averaged adapter does not match this model's LoRA layers")
        with torch.no_grad():
            for n, e in have.items():
                e.data.copy_(state["adapter"][n])


class AveragedTeacher:
    """The objective's teacher `teacher(x, t, r, cond)` (no_grad) over the training module itself:
    "online" calls it as it is, "frozen" with LoRA switches the adapters off, "ema" and "frozen"
    without LoRA switch their average in for the call."""

    def __init__(self, module: nn.Module, mode: str, average: Any = None, adapters_off: Any = None) -> None:
        if mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {mode!r}; choose one of {list(TEACHER_MODES)}")
        self.mode = mode
        self.online = module
        self.average = average
        self.adapters_off = adapters_off

    @property
    def is_online(self) -> bool:
        return self.mode == "online"

    @property
    def decay(self) -> float:
        """Decay used by the most recent update (0 online, 1 frozen)."""
        if self.mode == "ema":
            return self.average.decay
        return 0.0 if self.mode == "online" else 1.0

    def update(self) -> None:
        if self.mode == "ema":
            self.average.update()

    def weights(self) -> contextlib.AbstractContextManager:
        if self.adapters_off is not None:
            return self.adapters_off()
        if isinstance(self.average, AdapterAverage):
            return self.average.active()
        if isinstance(self.average, ShardedAverage):
            return self.average.swapped_in()
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        with self.weights():
            return self.online(x, t, r, dict(cond))


class Averages:
    """What the training loop holds: `update_teacher()` and `update_sampling()` once per optimizer
    step, `teacher` for the objective, `sampling()` for grids, judges and the export, and one
    checkpoint file per rank (`save` / `load`)."""

    def __init__(self, teacher: AveragedTeacher, sampling: ShardedAverage | AdapterAverage | None) -> None:
        self.teacher = teacher
        self.sample_ema = sampling

    def update_teacher(self) -> None:
        self.teacher.update()

    def update_sampling(self) -> None:
        if self.sample_ema is not None:
            self.sample_ema.update()

    @contextlib.contextmanager
    def sampling(self) -> Iterator[nn.Module]:
        """The module to sample or export from, holding the sampling EMA when the job keeps one (every
        rank enters: under ZeRO-3 the module gathers layer by layer as in training)."""
        module = self.teacher.online
        if self.sample_ema is None:
            yield module
        elif isinstance(self.sample_ema, AdapterAverage):
            with self.sample_ema.copied_into_trained_adapter():
                yield module
        else:
            with self.sample_ema.swapped_in():
                yield module

    def _parts(self) -> dict[str, Any]:
        parts = {}
        if self.teacher.average is not None:
            parts["teacher"] = self.teacher.average
        if self.sample_ema is not None:
            parts["sample_ema"] = self.sample_ema
        return parts

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_mode": self.teacher.mode, **{k: v.state_dict() for k, v in self._parts().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check(state)
        for k, v in self._parts().items():
            v.load_state_dict(state[k])

    def _check(self, state: Mapping[str, Any]) -> None:
        if state.get("teacher_mode") != self.teacher.mode:
            raise ValueError(
                f"checkpoint teacher mode {state.get('teacher_mode')!r} != configured {self.teacher.mode!r}"
            )
        for k in self._parts():
            if k not in state:
                what = "sampling EMA" if k == "sample_ema" else "teacher average"
                raise ValueError(
                    f"the checkpoint holds no {what} but the job keeps one (train.sample_ema / "
                    f"method.teacher); resume with the job's original settings or start over with --fresh"
                )

    def save(self, directory: str | Path) -> Path | None:
        """This rank's averages into `directory` (every rank calls it); None when there are none."""
        if not self._parts():
            return None
        rank, _ = _world()
        path = Path(directory) / FILE_PATTERN.format(rank=rank)
        torch.save(self.state_dict(), path)
        return path

    def load(self, directory: str | Path) -> bool:
        """Restore from a checkpoint directory written by `save` at any world size; False when it
        holds no averages (a job without any)."""
        if not self._parts():
            return False
        rank, world = _world()
        files = sorted(Path(directory).glob(FILE_PATTERN.format(rank="*")), key=_rank_of)
        if not files:
            raise ValueError(
                f"checkpoint {directory} holds no averages ({FILE_PATTERN.format(rank='<R>')}) but the "
                "job keeps an EMA; resume with the job's original settings or start over with --fresh"
            )
        own = Path(directory) / FILE_PATTERN.format(rank=rank)
        if len(files) == world and own.exists():
            self.load_state_dict(torch.load(own, map_location="cpu", weights_only=True))
            return True
        states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        self._check(states[0])
        for k, v in self._parts().items():
            v.load_resharded([s[k] for s in states])
        return True


def _rank_of(path: Path) -> int:
    return int(path.stem.rsplit("rank", 1)[1])


def _zero_subtrees(module: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules whose every parameter is a ZeRO-3 one (the averaged adapters, added
    after DeepSpeed wrapped the model, are plain tensors that DeepSpeed's release must not see)."""
    params = list(module.parameters())
    if all(hasattr(p, "ds_id") for p in params):
        yield module
        return
    if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
        raise ValueError(f"{type(module).__name__} mixes ZeRO-3 and plain parameters of its own")
    for child in module.children():
        yield from _zero_subtrees(child)


def zero3_release(engine: Any) -> Callable[[], None] | None:
    """Releases every gathered ZeRO-3 parameter of `engine` (so a swap reaches the next gather)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return None

    def release() -> None:
        coordinator = offload.get_param_coordinator()
        for sub in _zero_subtrees(engine.module):
            coordinator.release_and_reset_all(sub)

    return release


def build(
    module: nn.Module,
    *,
    teacher_mode: str,
    teacher_decay: float,
    sample_decay: float | None,
    release: Callable[[], None] | None = None,
    host: bool = False,
) -> Averages:
    """Averages on `module` (the engine's module after DeepSpeed wrapped it, or a plain model)."""
    device = torch.device("cpu") if host else None
    lora = has_lora(module)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def average(name: str, decay: float | None) -> ShardedAverage | AdapterAverage:
        if lora and decay is not None:
            return AdapterAverage(module, name, decay, release=release, device=device)
        return ShardedAverage(trainable, decay, release=release, device=device)

    adapters_off = None
    teacher_average = None
    if teacher_mode == "ema":
        teacher_average = average(TEACHER_ADAPTER, teacher_decay)
    elif teacher_mode == "frozen":
        if lora:
            adapters_off = lambda: disable_adapters(module)  # noqa: E731
        else:
            teacher_average = average("frozen", None)
    sampling = average(SAMPLING_ADAPTER, sample_decay) if sample_decay else None
    return Averages(AveragedTeacher(module, teacher_mode, teacher_average, adapters_off), sampling)
