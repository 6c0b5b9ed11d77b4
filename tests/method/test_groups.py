import pytest

from twinflow.method.groups import GROUP_NAMES, split_groups, weights_from_lambda


def _check_contiguous(split, B):
    stop = 0
    for name in GROUP_NAMES:
        s = split.slice(name)
        assert s.start == stop and s.stop - s.start == split.size(name)
        stop = s.stop
    assert stop == B == split.batch_size


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("B", [4, 5, 6, 7, 8, 9, 12, 16, 31, 64, 128])
def test_lambda_splits(lam, B):
    split = split_groups(B, lambda_=lam)
    _check_contiguous(split, B)
    w = weights_from_lambda(lam)
    active = [k for k in GROUP_NAMES if w[k] > 0]
    for k in GROUP_NAMES:
        if w[k] == 0:
            assert split.size(k) == 0
        else:
            assert split.size(k) >= 1
            # Rounding and the remainder move each group by less than one row per group.
            assert abs(split.size(k) - B * w[k]) < len(active)
    assert split.size("e2e") + split.size("adv") >= (1 if lam > 0 else 0)


def test_reference_quarters_and_extremes():
    assert split_groups(8, lambda_=0.5).as_dict() == {"e2e": 2, "mul": 2, "any": 2, "adv": 2}
    assert split_groups(4, lambda_=0.5).sizes == (1, 1, 1, 1)
    assert split_groups(7, lambda_=0.5).sizes == (2, 2, 2, 1)  # reference rounding, rest to last
    assert split_groups(5, lambda_=0.5).sizes == (1, 1, 1, 2)
    # The reference gives (2, 2, 2, 0) at B=6: the ADV group would silently vanish. We keep it.
    assert split_groups(6, lambda_=0.5).sizes == (1, 2, 2, 1)
    assert split_groups(10, lambda_=0.0).sizes == (0, 5, 5, 0)
    assert split_groups(10, lambda_=1.0).sizes == (5, 0, 0, 5)
    assert split_groups(12, lambda_=1 / 3).sizes == (2, 4, 4, 2)


def test_explicit_weights():
    split = split_groups(10, weights={"e2e": 1, "mul": 2, "any": 2, "adv": 0})
    assert split.sizes == (2, 4, 4, 0)
    _check_contiguous(split, 10)
    assert split.base == slice(0, 10) and split.cfg == slice(2, 10)
    tiny = split_groups(4, weights={"e2e": 0.01, "mul": 0.01, "any": 0.97, "adv": 0.01})
    assert tiny.sizes == (1, 1, 1, 1)
    assert split_groups(3, weights={"adv": 1.0}).sizes == (0, 0, 0, 3)


def test_invalid_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 4 rows"):
        split_groups(3, lambda_=0.5)
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
        split_groups(8, lambda_=1.5)
    with pytest.raises(ValueError, match="unknown group"):
        split_groups(8, weights={"e2e": 1, "gan": 1})
    with pytest.raises(ValueError, match="positive sum"):
        split_groups(8, weights={"e2e": 0})
    with pytest.raises(ValueError, match="exactly one"):
        split_groups(8)
