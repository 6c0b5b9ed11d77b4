"""An EMA restored from a checkpoint carries on with the saved decay, not the one it was built with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinflow.method.ema import EMA, next_decay


def test_a_restored_ema_keeps_the_saved_decay_schedule():
    torch.manual_seed(0)
    online = nn.Linear(3, 2)
    saved = EMA(online, 0.9)
    for _ in range(2):
        saved.update(online)
    restored = EMA(online, 0.5)
    restored.load_state_dict(saved.state_dict())
    assert (restored.decay, restored.current_decay, restored.num_updates) == (0.9, saved.current_decay, 2)
    restored.update(online)
    assert restored.current_decay == next_decay(saved.current_decay, 0.9)


def test_a_decay_outside_the_open_interval_is_refused():
    online = nn.Linear(3, 2)
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="EMA decay must be in \\(0, 1\\)"):
            EMA(online, decay)
