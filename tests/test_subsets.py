"""--labelled_fraction: which training cases keep their labels."""

import numpy as np
import pytest

from train.config import ConfigError, preset
from train.data.subsets import Subset, labelled_indices, labelled_subset


def test_labelled_cases_are_seeded_nested_and_at_least_one():
    small, large = labelled_indices(24, 0.25, seed=3), labelled_indices(24, 0.5, seed=3)
    assert len(small) == 6 and len(large) == 12
    assert set(small) <= set(large)  # a larger fraction only adds cases
    np.testing.assert_array_equal(small, labelled_indices(24, 0.25, seed=3))
    assert not np.array_equal(small, labelled_indices(24, 0.25, seed=4))
    assert len(labelled_indices(5, 0.01, seed=0)) == 1
    np.testing.assert_array_equal(labelled_indices(7, 1.0, seed=0), np.arange(7))


def test_every_class_keeps_a_labelled_case():
    classes = np.repeat([0, 1, 2, 3], [30, 5, 3, 2])
    picks = labelled_indices(len(classes), 0.1, seed=0, classes=classes)
    assert sorted(set(classes[picks])) == [0, 1, 2, 3]
    assert np.sum(classes[picks] == 0) == 3


class _Source:
    num_classes, num_channels, task = 3, 1, "classification"

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"name": f"case{i}"}

    def classes(self):
        return np.arange(10) % 2


def test_subset_reads_the_kept_cases_and_keeps_the_source_attributes():
    source = _Source()
    assert labelled_subset(source, 1.0, seed=0) is source
    sub = labelled_subset(source, 0.4, seed=1)
    assert isinstance(sub, Subset) and len(sub) == 4 and sub.num_classes == 3 and sub.task == "classification"
    names = {sub[i]["name"] for i in range(len(sub))}
    assert names == {f"case{i}" for i in sub.indices}
    np.testing.assert_array_equal(sub.classes(), sub.indices % 2)
    assert sorted(set(sub.classes())) == [0, 1]


@pytest.mark.parametrize("flag,value", [("labelled_fraction", 0.0), ("labelled_fraction", 1.5), ("kd_weight", -0.1),
                                        ("kd_temperature", 0.0), ("dims", "3"), ("teacher", "no/such/run")])
def test_bad_values_name_their_flag(flag, value):
    with pytest.raises(ConfigError) as err:
        preset("cpu-tiny", **{flag: value})
    assert err.value.flag == flag


def test_a_2d_run_does_not_inflate():
    with pytest.raises(ConfigError, match="--init=scratch") as err:
        preset("cpu-tiny", dims="2", init="scale")
    assert err.value.flag == "dims"
    assert preset("cpu-tiny", dims="2", init="scratch").model_dims == 2
    assert preset("cpu-tiny", init="acs").model_dims == "acs"
