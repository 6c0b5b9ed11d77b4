"""teacher.pt (the EMA teacher and sampling EMA) holds plain tensors and numbers and loads with
weights_only=True: a file carrying a pickled object, which a load would execute, is refused."""

from __future__ import annotations

import pytest
import torch

from twinflow.method.ema import EMA, Teacher
from twinflow.train.checkpointing import CheckpointError, load_averages, save_averages
from twinflow.train.modelling import Averages


def _averages(seed: int) -> Averages:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    return Averages(Teacher(net, "ema", decay=0.9), EMA(net, 0.99))


def test_the_teacher_and_sampling_ema_round_trip_as_plain_tensors(tmp_path):
    a = _averages(0)
    a.teacher.update()
    a.sample_ema.update(a.teacher.online)
    path = tmp_path / "teacher.pt"
    save_averages(a, path)
    torch.load(path, weights_only=True)  # nothing but tensors, numbers, strings and containers
    b = _averages(1)
    load_averages(b, path)
    assert b.teacher.ema.num_updates == 1 and b.teacher.ema.current_decay == a.teacher.ema.current_decay
    for x, y in zip(a.teacher.module.state_dict().values(), b.teacher.module.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.sample_ema.module.state_dict().values(), b.sample_ema.module.state_dict().values()):
        assert torch.equal(x, y)


def test_an_online_teacher_without_ema_writes_nothing(tmp_path):
    net = torch.nn.Linear(2, 2)
    save_averages(Averages(Teacher(net, "online"), None), tmp_path / "teacher.pt")
    assert not (tmp_path / "teacher.pt").exists()


class Payload:
    """Anything a pickle rebuilds by calling code; here it would only set a flag."""

    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    Payload.ran = True
    return {}


def test_a_teacher_file_carrying_a_pickled_object_is_refused(tmp_path):
    a = _averages(0)
    state = a.state_dict()
    state["ema"]["extra"] = Payload()
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"teacher\.pt: refused"):
        load_averages(_averages(1), path)
    assert not Payload.ran  # refused before anything was executed
