"""The 'gemm' convolution lowering (acsjax.lowering) against XLA's convolution: forward and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acsjax import ops


@pytest.fixture
def gemm():
    ops.set_conv_impl("gemm")
    yield
    ops.set_conv_impl("xla")


def _both(fn, *args):
    """fn's value and gradients under 'gemm' and under 'xla'."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731  a non-trivial cotangent
    out = []
    for impl in ("gemm", "xla"):
        ops.set_conv_impl(impl)
        out.append((fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)))
    return out


CASES = [
    # (x shape, kernel shape, kwargs, acs)
    ((1, 9, 8, 7, 4), (3, 3, 3, 4, 6), dict(padding=1), False),
    ((2, 6, 7, 8, 3), (2, 2, 2, 3, 5), dict(padding="SAME"), False),
    ((1, 8, 8, 8, 4), (3, 3, 3, 4, 6), dict(padding=1, padding_mode="edge"), False),
    ((1, 8, 7, 6, 4), (3, 3, 3, 4, 6), dict(padding=1, strides=2), False),  # falls back to XLA
    ((1, 8, 8, 8, 5), (3, 3, 3, 1, 5), dict(padding=1, groups=5), False),  # depthwise
    ((2, 9, 10, 3), (3, 3, 3, 7), dict(padding=1), False),  # 2D
    ((1, 9, 8, 7, 4), (3, 3, 4, 7), dict(padding=1), True),
    ((1, 8, 8, 8, 4), (3, 3, 4, 8), dict(padding="VALID"), True),
    ((1, 8, 8, 8, 6), (3, 3, 1, 6), dict(padding=1, groups=6), True),  # depthwise ACS
]


@pytest.mark.parametrize("x_shape,k_shape,kwargs,acs", CASES)
def test_gemm_lowering_matches_xla(gemm, x_shape, k_shape, kwargs, acs):
    rng = np.random.default_rng(sum(x_shape))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    fn = (lambda x, k: ops.acs_conv(x, k, **kwargs)) if acs else (lambda x, k: ops.conv(x, k, **kwargs))
    lowered = "custom_vjp" in str(jax.make_jaxpr(fn)(x, k))
    assert lowered == (kwargs.get("strides", 1) == 1), "the gemm path must run exactly where it applies"
    (y_fast, g_fast), (y_ref, g_ref) = _both(fn, x, k)
    chex.assert_trees_all_close(y_fast, y_ref, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(g_fast, g_ref, atol=2e-3, rtol=1e-3)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match=r"conv impl must be one of \('xla', 'gemm'\), got 'fast'"):
        ops.set_conv_impl("fast")
