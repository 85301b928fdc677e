"""The step benchmark's profile: per-operation times read back from a JAX profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from train import bench
from train.benchmarks import _optime as optime


def _loop_program():
    """A jitted program whose loop runs one matrix product 7 times, and its compiled text."""

    def f(x):
        return jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ x), x)

    x = jnp.eye(64) * 0.5
    compiled = jax.jit(f).lower(x).compile()
    return (lambda: jax.block_until_ready(compiled(x))), compiled.as_text()


def test_instructions_parse_names_shapes_and_opcodes():
    _, text = _loop_program()
    ops = optime.instructions(text)
    assert "while" in {opcode for _, opcode in ops.values()}
    assert all(shape.startswith(("f32[", "s32[", "pred[", "(")) for shape, _ in ops.values())


def test_profile_counts_loop_bodies_per_run_and_skips_their_loop(tmp_path):
    run, text = _loop_program()
    run()
    rows = optime.profile(run, text, runs=2, trace_dir=str(tmp_path / "trace"), by="shape")
    by_shape = {r.key: r for r in rows}
    # The product (fused with tanh or not) runs once per iteration: 7 times per run, at 64x64.
    assert by_shape["f32[64,64]"].calls >= 7
    kinds = {r.key for r in optime.profile(run, text, runs=1, trace_dir=str(tmp_path / "kinds"))}
    assert not any(k == "while" or k.startswith("while.") for k in kinds)
    table = optime.markdown(rows, top=1)
    assert table.splitlines()[-1].startswith("| all |")


def test_profile_rejects_an_unknown_grouping(tmp_path):
    run, text = _loop_program()
    with pytest.raises(ValueError, match="by"):
        optime.profile(run, text, runs=1, trace_dir=str(tmp_path), by="colour")


def test_step_benchmark_prints_where_the_time_goes(tmp_path, capsys):
    # XLA's own convolutions compile in a third of the GEMM lowering's time; the profile path is the same.
    argv = ["step", "--patch", "8", "--batch", "1", "--widths", "4,8", "--impls", "xla", "--repeats", "1",
            "--no_torch", "--profile", str(tmp_path / "trace")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "Where acsjax (xla)'s step time goes" in out
    assert "| all |" in out


def test_a_trace_without_the_programs_operations_is_a_one_line_profile_error(tmp_path, monkeypatch, capsys):
    # A stand-in step (the loop program) keeps this cheap; the trace is made to hold none of its operations,
    # as a backend whose profiler names its events otherwise would.
    from train.benchmarks import step

    run, text = _loop_program()
    monkeypatch.setattr(step, "jax_step", lambda *args: (run, text))
    monkeypatch.setattr(step, "step_flops", lambda *args: 1.0)
    monkeypatch.setattr(optime, "_trace_events", lambda trace_dir: [])
    argv = ["step", "--patch", "8", "--batch", "1", "--widths", "4,8", "--impls", "xla", "--repeats", "1",
            "--no_torch", "--profile", str(tmp_path / "trace")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --profile: the profiler recorded none of the program's operations"


def test_scan_unroll_counts_are_compared_with_the_first(monkeypatch, capsys):
    # Stand-in steps (no compilation); each records the unroll count it was built with.
    from train.benchmarks import step

    run, text = _loop_program()
    built = []
    monkeypatch.setattr(step, "jax_step", lambda config, batch, patch, impl, unroll: (built.append(unroll), run, text)[1:])
    monkeypatch.setattr(step, "step_flops", lambda *args: 1.0)
    argv = ["step", "--patch", "8", "--batch", "1", "--widths", "4,8", "--impls", "xla", "--repeats", "1",
            "--no_torch", "--scan_unroll", "1,2", "--runs", "2"]
    assert bench.main(argv) == 0
    assert built == [1, 2]
    out = capsys.readouterr().out
    assert "| acsjax (xla) unroll 2 |" in out
    assert "| xla: unroll 2 / 1 |" in out


def test_a_scan_unroll_below_one_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["step", "--scan_unroll", "0", "--no_torch"])
    assert "--scan_unroll" in capsys.readouterr().err


def test_step_flops_count_every_depth_slice_whatever_the_lowering(monkeypatch):
    # The GEMM lowering streams over depth (tiny chunks force its scans); XLA's cost analysis counts a loop body
    # once, so a count taken from that program would not double with the depth nor stay put when the scans unroll.
    from acsjax import lowering, ops
    from train import config as config_lib
    from train.benchmarks import step

    config = config_lib.preset("gpu", model="unet", model_options={"widths": (4, 8), "norm": "instance"},
                               remat="", deep_supervision=False, init="scale")
    monkeypatch.setattr(lowering, "CHUNK_BYTES", 1)
    with ops.use_conv_impl("gemm"):
        counts = {}
        for unroll in (1, 2):
            monkeypatch.setattr(lowering, "SCAN_UNROLL", unroll)
            counts[unroll] = [step.step_flops(config, 1, (depth, 8, 8)) for depth in (8, 16)]
    assert counts[1] == counts[2]
    thin, deep = counts[1]
    assert 1.9 < deep / thin < 2.1
