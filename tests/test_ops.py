"""Convolution lowerings against the plain XLA convolution ('xla'): forward, input and kernel gradients."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acsjax import lowering, ops


def _run(fn, x, k, impl):
    """fn's output and (d/dx, d/dk) of sum(sin(output)) under ``impl``, jitted once."""

    def loss(x, k):
        y = fn(x, k, impl)
        # sin gives a cotangent that differs per element, so a wrong tap or channel shows.
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)
    return y, grads


def _inputs(x_shape, k_shape, dtype=jnp.float32):
    rng = np.random.default_rng(sum(x_shape) + 7 * sum(k_shape))
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    k = jnp.asarray(rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:-1])), dtype)
    return x, k


def _primitives(fn, x, k, impl) -> str:
    return str(jax.make_jaxpr(lambda x, k: fn(x, k, impl))(x, k))


def _conv(**kwargs):
    return lambda x, k, impl: ops.conv(x, k, impl=impl, **kwargs)


def _acs(**kwargs):
    return lambda x, k, impl: ops.acs_conv(x, k, impl=impl, **kwargs)


def _close(fast, ref, tol):
    """Max error relative to the reference's largest magnitude, leaf by leaf."""
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
        assert err < tol, f"relative error {err:.2e} >= {tol}"


# (x shape, kernel shape, op). Odd and even sizes, strides 1 and 2, int/SAME/VALID
# padding, edge padding, depthwise groups, 1x1 and 1xkxk kernels, 2D.
CASES = {
    "3d-odd-pad1": ((1, 7, 6, 5, 3), (3, 3, 3, 3, 4), _conv(padding=1)),
    "3d-even-same": ((2, 6, 8, 4, 4), (3, 3, 3, 4, 5), _conv(padding="SAME")),
    "3d-k2-same": ((1, 8, 7, 6, 3), (2, 2, 2, 3, 4), _conv(padding="SAME")),
    "3d-valid": ((1, 7, 6, 5, 3), (3, 3, 3, 3, 4), _conv(padding="VALID")),
    "3d-pairs": ((1, 6, 7, 5, 2), (3, 3, 3, 2, 3), _conv(padding=((2, 0), (1, 1), (0, 2)))),
    "3d-stride2-odd": ((1, 7, 9, 5, 3), (3, 3, 3, 3, 4), _conv(padding=1, strides=2)),
    "3d-stride2-even-same": ((2, 8, 8, 6, 4), (3, 3, 3, 4, 5), _conv(padding="SAME", strides=2)),
    "3d-stride122-k2": ((1, 6, 8, 8, 3), (2, 2, 2, 3, 4), _conv(padding="VALID", strides=(1, 2, 2))),
    "3d-edge": ((1, 6, 7, 5, 3), (3, 3, 3, 3, 4), _conv(padding=1, padding_mode="edge")),
    "3d-edge-stride2": ((1, 7, 6, 6, 3), (3, 3, 3, 3, 4), _conv(padding=1, padding_mode="edge", strides=2)),
    "3d-depthwise": ((1, 6, 7, 5, 5), (3, 3, 3, 1, 5), _conv(padding=1, groups=5)),
    "3d-depthwise-stride2": ((2, 7, 6, 6, 4), (3, 3, 3, 1, 4), _conv(padding="SAME", groups=4, strides=2)),
    "3d-1x1": ((2, 5, 4, 3, 6), (1, 1, 1, 6, 7), _conv()),
    "3d-2.5d": ((1, 5, 7, 6, 3), (1, 3, 3, 3, 4), _conv(padding=((0, 0), (1, 1), (1, 1)))),
    "2d-pad1": ((3, 9, 8, 3), (3, 3, 3, 5), _conv(padding=1)),
    "2d-stride2": ((2, 9, 10, 3), (3, 3, 3, 4), _conv(padding=1, strides=2)),
    "acs-odd-split0": ((1, 7, 6, 5, 3), (3, 3, 3, 6), _acs(padding=1)),
    "acs-even-split1": ((2, 6, 8, 4, 4), (3, 3, 4, 7), _acs(padding=1)),
    "acs-split2-valid": ((1, 7, 7, 6, 3), (3, 3, 3, 8), _acs(padding="VALID")),
    "acs-cout1": ((1, 5, 6, 7, 3), (3, 3, 3, 1), _acs(padding="SAME")),
    "acs-stride2": ((1, 7, 8, 6, 3), (3, 3, 3, 7), _acs(padding=1, strides=2)),
    "acs-stride2-same-even": ((2, 8, 6, 8, 2), (3, 3, 2, 6), _acs(padding="SAME", strides=2)),
    "acs-edge": ((1, 6, 5, 7, 3), (3, 3, 3, 5), _acs(padding=1, padding_mode="edge")),
    "acs-k5": ((1, 7, 6, 8, 2), (5, 5, 2, 4), _acs(padding=2)),
    "acs-depthwise": ((1, 6, 7, 5, 5), (3, 3, 1, 5), _acs(padding=1, groups=5)),
    "acs-depthwise-stride2": ((1, 7, 6, 8, 6), (3, 3, 1, 6), _acs(padding=1, groups=6, strides=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gemm_matches_xla(name):
    x_shape, k_shape, fn = CASES[name]
    x, k = _inputs(x_shape, k_shape)
    # The fast path must really run: no XLA convolution left in the 'gemm' program.
    assert "conv_general_dilated" not in _primitives(fn, x, k, "gemm")
    assert "conv_general_dilated" in _primitives(fn, x, k, "xla")
    _close(_run(fn, x, k, "gemm"), _run(fn, x, k, "xla"), 2e-5)


@pytest.mark.parametrize("name", ["3d-odd-pad1", "3d-stride2-odd", "3d-pairs", "acs-even-split1", "acs-k5", "2d-pad1"])
def test_streaming_matches_xla(name, monkeypatch):
    """Tiny chunks force the scan over depth slices that large volumes take."""
    monkeypatch.setattr(lowering, "CHUNK_BYTES", 1)
    x_shape, k_shape, fn = CASES[name]
    x, k = _inputs(x_shape, k_shape)
    assert "scan" in _primitives(fn, x, k, "gemm")
    _close(_run(fn, x, k, "gemm"), _run(fn, x, k, "xla"), 2e-5)


@pytest.mark.parametrize("unroll", [1, 3])
def test_depth_slices_per_scan_iteration_leave_values_and_gradients_unchanged(unroll, monkeypatch):
    """7 depth slices over 1 or 3 per iteration (a remainder of 1): every scan form and the kernel gradient."""
    monkeypatch.setattr(lowering, "SCAN_UNROLL", unroll)
    for knob in ("CHUNK_BYTES", "ROW_BYTES", "WGRAD_BYTES"):
        monkeypatch.setattr(lowering, knob, 1)
    for name in ("3d-odd-pad1", "acs-odd-split0"):
        x_shape, k_shape, fn = CASES[name]
        x, k = _inputs(x_shape, k_shape)
        assert f"unroll={unroll}" in _primitives(fn, x, k, "gemm")
        _close(_run(fn, x, k, "gemm"), _run(fn, x, k, "xla"), 2e-5)


@pytest.mark.parametrize("name", ["3d-even-same", "3d-stride2-odd", "3d-depthwise", "acs-odd-split0", "acs-depthwise"])
def test_bfloat16(name):
    """bfloat16 in, bfloat16 out; both lowerings stay close to the float32 result."""
    x_shape, k_shape, fn = CASES[name]
    x, k = _inputs(x_shape, k_shape)
    exact = _run(fn, x, k, "xla")
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    fast, ref = _run(fn, xb, kb, "gemm"), _run(fn, xb, kb, "xla")
    _close(fast, ref, 5e-2)
    as_f32 = jax.tree.map(lambda a: a.astype(jnp.float32), fast)
    _close(as_f32, exact, 3e-2)


def test_unsupported_groups_fall_back_to_xla():
    """Grouped (not depthwise) and channel-multiplier convolutions keep XLA's convolution."""
    for x_shape, k_shape, fn in [
        ((1, 5, 6, 4, 4), (3, 3, 3, 2, 6), _conv(padding=1, groups=2)),
        ((1, 5, 6, 4, 3), (3, 3, 3, 1, 6), _conv(padding=1, groups=3)),
    ]:
        x, k = _inputs(x_shape, k_shape)
        assert "conv_general_dilated" in _primitives(fn, x, k, "gemm")
        _close(_run(fn, x, k, "gemm"), _run(fn, x, k, "xla"), 1e-6)


def test_auto_choice_and_switch():
    previous = ops.get_conv_impl()
    with ops.use_conv_impl("xla"):
        assert ops.get_conv_impl() == "xla"
        assert ops.resolve_impl(None, 3) == "xla"
        assert ops.resolve_impl("gemm", 2) == "gemm"
        ops.set_conv_impl("auto")
        # On CPU (the test backend) 3D and ACS convolutions take the fast path, 2D ones XLA's.
        assert jax.default_backend() == "cpu"
        assert ops.resolve_impl(None, 3) == "gemm"
        assert ops.resolve_impl(None, 2) == "xla"
        x, k = _inputs((1, 5, 5, 5, 2), (3, 3, 3, 2, 3))
        assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, k: ops.conv(x, k, padding=1))(x, k))
        with pytest.raises(ValueError, match=r"conv impl must be one of \('auto', 'xla', 'gemm'\), got 'fast'"):
            ops.set_conv_impl("fast")
        with pytest.raises(ValueError, match="got 'cudnn'"):
            ops.conv(x, k, impl="cudnn")
    assert ops.get_conv_impl() == previous  # the block's default is undone


def test_the_cli_offers_exactly_the_lowerings_ops_knows():
    from train import config

    assert config.CONV_IMPLS == ops.CONV_IMPLS


def test_use_conv_impl_restores_the_default_even_on_error():
    before = ops.get_conv_impl()
    other = "gemm" if before != "gemm" else "xla"
    with pytest.raises(RuntimeError):
        with ops.use_conv_impl(other):
            assert ops.get_conv_impl() == other
            raise RuntimeError
    assert ops.get_conv_impl() == before


def test_env_var_sets_the_default():
    code = "from acsjax import ops; print(ops.get_conv_impl())"
    env = dict(os.environ, ACSJAX_CONV_IMPL="xla", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "xla"
    env["ACSJAX_CONV_IMPL"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "conv impl must be one of" in bad.stderr


def test_gemm_under_vmap_and_remat():
    """The custom VJPs compose with vmap and jax.checkpoint like XLA's convolution."""
    x, k = _inputs((2, 1, 5, 6, 4, 3), (3, 3, 3, 3, 4))

    def loss(x, k, impl):
        f = jax.checkpoint(lambda v: ops.conv(v, k, padding=1, impl=impl))
        return jnp.sum(jnp.sin(jax.vmap(f)(x)))

    fast = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, k, "gemm")
    ref = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, k, "xla")
    chex.assert_trees_all_close(fast, ref, atol=2e-5, rtol=2e-5)


# Chunked (streamed, one-byte budgets) forms compile many small programs: by default only the small 3D case runs
# chunked; the larger cases' chunked runs are -m slow.
_CASES_CHUNKED = [
    pytest.param(name, chunked, marks=[pytest.mark.slow] if chunked and name != "3d-pairs" else [])
    for name in ("3d-pairs", "3d-stride2-odd", "acs-k5") for chunked in (False, True)
]


@pytest.mark.parametrize("form", ["scatter", "gather", "hybrid"])
@pytest.mark.parametrize("name,chunked", _CASES_CHUNKED)
def test_forms_match_xla(name, chunked, form, monkeypatch):
    """Each GEMM form, over the whole volume and (chunked) streamed over depth slices and row chunks."""
    monkeypatch.setattr(lowering, "FORM", form)
    if chunked:
        for knob in ("CHUNK_BYTES", "ROW_BYTES", "WGRAD_BYTES"):
            monkeypatch.setattr(lowering, knob, 1)
    x_shape, k_shape, fn = CASES[name]
    x, k = _inputs(x_shape, k_shape)
    assert ("scan" in _primitives(fn, x, k, "gemm")) == chunked
    _close(_run(fn, x, k, "gemm"), _run(fn, x, k, "xla"), 2e-5)
