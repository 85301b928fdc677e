"""Shared test fixtures."""

import importlib.util
import os
import pathlib
import shutil
import tempfile

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



# Set before any test module imports JAX (JAX reads its variables at import):
# caches go to a temporary XDG_CACHE_HOME, never the user's, in this process
# and in every subprocess and notebook kernel it starts (they inherit the
# environment). Compiled programs are kept there too, so the many subprocesses
# that compile the same programs (the CLI runs, the SIGKILL test's three runs)
# compile each once; thresholds 0 because on CPU most programs compile in
# under JAX's default 1 s.
_saved_env: dict[str, str | None] = {}
_cache_root: list[str] = []


def pytest_configure(config):
    root = tempfile.mkdtemp(prefix="acsjax-test-cache-")
    _cache_root.append(root)
    env = {
        "XDG_CACHE_HOME": root,
        "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    _saved_env.update({k: os.environ.get(k) for k in env})
    os.environ.update(env)


def pytest_unconfigure(config):
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for root in _cache_root:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_cache_home() -> pathlib.Path:
    """The temporary XDG_CACHE_HOME of this test session."""
    return pathlib.Path(os.environ["XDG_CACHE_HOME"])
