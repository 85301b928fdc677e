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


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """Caches go to a temporary XDG_CACHE_HOME, never the user's: in this process and every subprocess and notebook kernel it starts (they inherit the environment)."""
    path = tmp_path_factory.mktemp("cache_home")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
