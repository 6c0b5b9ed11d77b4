import pytest
import torch

from twinflow.method.conditioning import cat_cond, cond_batch_size, cond_to, expand_cond, mix_cond, take_cond


def test_empty_dicts_pass_through():
    assert cat_cond([{}, {}]) == {}
    assert take_cond({}, slice(0, 2)) == {}
    assert expand_cond({}, 5) == {}
    assert mix_cond({}, {}, torch.tensor([True, False])) == {}
    assert cond_batch_size({}) is None


def test_cat_pads_shorter_text_with_masked_tokens():
    a = {"text_states": torch.ones(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool)}
    null = {"text_states": torch.full((1, 1, 4), 7.0), "text_mask": torch.ones(1, 1, dtype=torch.bool)}
    out = cat_cond([a, expand_cond(null, 2)])
    assert out["text_states"].shape == (4, 3, 4)
    assert out["text_mask"].tolist() == [[True] * 3] * 2 + [[True, False, False]] * 2
    assert torch.equal(out["text_states"][2:, 0], torch.full((2, 4), 7.0))
    assert torch.equal(out["text_states"][2:, 1:], torch.zeros(2, 2, 4))


def test_take_and_expand():
    cond = {"label": torch.arange(6)}
    assert take_cond(cond, slice(2, 4))["label"].tolist() == [2, 3]
    assert take_cond(cond, 5)["label"].tolist() == [5]
    assert expand_cond({"label": torch.tensor([9])}, 3)["label"].tolist() == [9, 9, 9]
    with pytest.raises(ValueError, match="batch size 1 or 3"):
        expand_cond({"label": torch.tensor([9, 9])}, 3)


def test_mismatched_keys_and_batches_are_errors():
    with pytest.raises(ValueError, match="different keys"):
        cat_cond([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="different batch sizes"):
        cond_batch_size({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_mix_cond_replaces_selected_rows():
    cond = {"label": torch.tensor([0, 1, 2, 3])}
    out = mix_cond(cond, {"label": torch.tensor([8])}, torch.tensor([False, True, False, True]))
    assert out["label"].tolist() == [0, 8, 2, 8]


def test_cond_to_casts_floating_tensors_and_keeps_masks():
    cond = {"text_states": torch.randn(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.long)}
    half = cond_to(cond, "cpu", torch.bfloat16)
    assert half["text_states"].dtype == torch.bfloat16 and half["text_mask"].dtype == torch.long
    assert torch.equal(half["text_states"], cond["text_states"].to(torch.bfloat16))
    same = cond_to(cond, "cpu")
    assert same["text_states"].dtype == torch.float32 and torch.equal(
        same["text_states"], cond["text_states"]
    )
