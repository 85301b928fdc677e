"""The accelerator benchmark's code path on tiny CPU shapes: it runs, without grain, nibabel or torch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]

# Importing a module whose sys.modules entry is None raises ImportError: the
# GPU machine has no grain or nibabel, and may lack torch.
BLOCKED = """
import sys
for name in ("grain", "nibabel", "torch"):
    sys.modules[name] = None
from train import bench
sys.exit(bench.main(["gpu", "--tiny", "--repeats", "1", "--out", sys.argv[1]]))
"""


def test_tiny_run_needs_no_grain_nibabel_or_torch(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["torch"] is None
    ops = {r["op"] for r in result["conv"]}
    assert {"acsjax 3D", "acsjax ACS"} <= ops and not any(o.startswith("PyTorch") for o in ops)
    # Every (shape, dtype) has both acsjax rows, timed and converted to TFLOP/s.
    for shape in gpu.TINY_SHAPES:
        for dtype in gpu.DTYPES:
            rows = [r for r in result["conv"] if tuple(r["shape"]) == shape and r["dtype"] == dtype]
            assert {"acsjax 3D", "acsjax ACS"} <= {r["op"] for r in rows}
            for r in rows:
                assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["tflops"] > 0
    names = {r["ratio"] for r in result["conv_ratios"]}
    assert "ACS / acsjax 3D" in names and "acsjax 3D / PyTorch Conv3d" not in names
    steps = {r["dims"]: r for r in result["step"]}
    assert {"3", "acs"} <= set(steps)
    assert steps["3"]["vs_3d"] == 1.0 and steps["3"]["flops"] > 0
    assert math.isclose(steps["acs"]["vs_3d"], steps["acs"]["median_ms"] / steps["3"]["median_ms"])
    # The printed table carries the same rows.
    assert "| acsjax ACS |" in proc.stdout and "U-Net step" in proc.stdout


def test_flops_and_ratios():
    shape = (2, 64, 64, 64, 32)
    assert gpu.conv_flops(shape, "3d") == 3 * 2.0 * 2 * 64**3 * 32 * 32 * 27
    assert gpu.conv_flops(shape, "acs") * 3 == gpu.conv_flops(shape, "3d")
    rows = [
        {"shape": [1, 2, 2, 2, 3], "dtype": "float32", "op": op, "median_ms": ms}
        for op, ms in [("acsjax 3D", 4.0), ("acsjax ACS", 1.0), ("PyTorch Conv3d", 2.0), ("PyTorch ACSConv algorithm", 2.0)]
    ]
    found = {r["ratio"]: r["time_ratio"] for r in gpu.conv_ratios(rows)}
    assert found == {
        "ACS / acsjax 3D": 0.25,
        "ACS / PyTorch ACSConv algorithm": 0.5,
        "acsjax 3D / PyTorch Conv3d": 2.0,
    }


def test_torch_rows_run():
    """Where torch is installed, its two rows run (on CPU here) and are counted as 3D and ACS."""
    pytest.importorskip("torch")
    cases = gpu.torch_conv_cases(gpu.TINY_SHAPES[0], "float32")
    assert set(cases) == {"PyTorch Conv3d", "PyTorch ACSConv algorithm"}
    for run, _ in cases.values():
        run()
    assert [kind for _, kind in cases.values()] == ["3d", "acs"]


def test_softacs_row_when_ops_has_it(monkeypatch):
    """A SoftACS row appears once ``acsjax.ops.soft_acs_conv`` exists, counted with the 3D FLOPs; a failing one is skipped."""
    from acsjax import ops

    calls = []

    def soft(x, kernel, view_logits, **kwargs):
        calls.append(view_logits.shape)
        return ops.acs_conv(x, kernel, **kwargs) * 1.0

    monkeypatch.setattr(ops, "soft_acs_conv", soft, raising=False)
    shape = gpu.TINY_SHAPES[0]
    with ops.use_conv_impl("xla"):
        rows = gpu.run_convs([shape], ["float32"], 1, False, lambda _: None)
    soft_row = next(r for r in rows if r["op"] == "acsjax SoftACS")
    assert calls and calls[0] == (shape[-1], 3)
    assert soft_row["tflops"] == pytest.approx(gpu.conv_flops(shape, "3d") / soft_row["median_ms"] / 1e9)

    def broken(*args, **kwargs):
        raise ValueError("not ready")

    monkeypatch.setattr(ops, "soft_acs_conv", broken)
    logged = []
    with ops.use_conv_impl("xla"):
        rows = gpu.run_convs([shape], ["float32"], 1, False, logged.append)
    assert {r["op"] for r in rows} == {"acsjax 3D", "acsjax ACS"}
    assert any("SoftACS" in line and "skipped" in line for line in logged)
