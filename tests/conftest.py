"""Shared test fixtures."""

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def mni_t1_path() -> str:
    """The MNI152 2009 T1 template shipped in nilearn's wheel (197x233x189, 1 mm)."""
    spec = importlib.util.find_spec("nilearn")
    assert spec is not None, "nilearn (a declared dependency) is not installed"
    path = os.path.join(
        spec.submodule_search_locations[0], "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    assert os.path.isfile(path), f"missing {path}"
    return path
