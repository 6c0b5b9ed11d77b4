"""The averages file of a checkpoint (`averages_rank<R>.pt`: the EMA teacher and sampling EMA) holds
plain tensors and numbers and loads with weights_only=True: a file carrying a pickled object, which a
load would execute, is refused before anything in it runs."""

from __future__ import annotations

import pickle

import pytest
import torch

from twinflow.train import averages as averages_mod


def _averages(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    return averages_mod.build(net, teacher_mode="ema", teacher_decay=0.9, sample_decay=0.99)


def test_the_averages_round_trip_as_plain_tensors(tmp_path):
    a = _averages(0)
    a.update_teacher()
    a.update_sampling()
    path = a.save(tmp_path)
    torch.load(path, weights_only=True)  # nothing but tensors, numbers, strings and containers
    b = _averages(1)
    assert b.load(tmp_path)
    for x, y in zip(a.teacher.average.full().values(), b.teacher.average.full().values()):
        assert torch.equal(x, y)


class Payload:
    """Anything a pickle rebuilds by calling code; here it would only set a flag."""

    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    Payload.ran = True
    return {}


def test_an_averages_file_carrying_a_pickled_object_is_refused(tmp_path):
    a = _averages(0)
    state = a.state_dict()
    state["payload"] = Payload()
    torch.save(state, tmp_path / averages_mod.FILE_PATTERN.format(rank=0))
    with pytest.raises(pickle.UnpicklingError):
        _averages(1).load(tmp_path)
    assert not Payload.ran  # refused before anything was executed
