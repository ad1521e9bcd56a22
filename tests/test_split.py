import pytest

from offsite.emulator import uniform_positions
from offsite.core.errors import OffsiteError
from offsite.model.split import Split, make_split


def uniform_full_indices(num_layers, a, n, b):
    split = make_split(num_layers, f"{a},{b}")
    middle = split.middle
    return [middle[p] for p in uniform_positions(len(middle), n)]


@pytest.mark.parametrize("layers,a,n,b,expected", [
    # Offsite-Tuning's published configurations (papers.md §2.1)
    (24, 2, 8, 2, [2, 5, 7, 10, 13, 16, 18, 21]),  # OPT-1.3B
    (48, 2, 16, 2, [2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45]),  # GPT2-XL
    (32, 2, 18, 2, [2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29]),  # OPT-6.7B
    (30, 2, 12, 2, [2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27]),  # BLOOM-7.1B
])
def test_uniform_rule_reproduces_ot_indices(layers, a, n, b, expected):
    assert uniform_full_indices(layers, a, n, b) == expected


def test_uniform_edges():
    assert uniform_positions(10, 10) == list(range(10))
    assert uniform_positions(10, 0) == []
    assert uniform_positions(10, 1) == [4]
    with pytest.raises(OffsiteError, match="between 0 and 10"):
        uniform_positions(10, 11)


def test_split_forms():
    s = make_split(12, "2,2")
    assert s.adapter == (0, 1, 10, 11) and s.middle == tuple(range(2, 10))
    assert make_split(12, "0,3").adapter == (9, 10, 11)
    assert make_split(24, "idx:0,5,18,23").adapter == (0, 5, 18, 23)
    assert make_split(24, [23, 0]).adapter == (0, 23)
    assert make_split(12, "2,2").to_dict()["middle"] == list(range(2, 10))


def test_all_layers_is_the_full_fine_tuning_split():
    for spec in ("all", "idx:" + ",".join(map(str, range(12)))):
        s = make_split(12, spec)
        assert s.adapter == tuple(range(12)) and s.middle == ()
        assert Split.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("spec,message", [
    ("6,6", "a\\+b must be at most 11"),
    ("0,0", "nothing to fine-tune"),
    ("-1,2", ">= 0"),
    ("2", "two numbers"),
    ("x,y", "cannot parse"),
    ("idx:0,12", "outside 0..11"),
    ("idx:1,1", "duplicates"),
])
def test_split_refusals(spec, message):
    with pytest.raises(OffsiteError, match=message):
        make_split(12, spec)
