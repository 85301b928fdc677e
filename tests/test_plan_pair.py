"""The memory planner's searches, and the plan of a distillation pair (python -m train.plan --pair):
a coarse 3D teacher and a full-resolution 2D student against the full-resolution 3D network."""

import os
import re
import subprocess
import sys

import pytest

from train import config as config_lib
from train.planning import memory, pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": "unet", "model_options": {"widths": (8, 16)}, "dtype": "bfloat16", "deep_supervision": False}


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "train.plan", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def _rows(stdout: str) -> dict[str, list[str]]:
    """Table rows of the plan by model name -> cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "model" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


def test_teacher_grid_is_the_volume_over_the_factor():
    assert pair.teacher_grid((2048, 2048, 2048), 4) == (512, 512, 512)
    assert pair.teacher_grid((64, 96, 32), 1) == (64, 96, 32)
    assert pair.teacher_grid((64, 96, 32), 2) == (32, 48, 16)
    with pytest.raises(ValueError, match="must be >= 1"):
        pair.teacher_grid((64, 64, 64), 0)
    with pytest.raises(ValueError, match="3 does not divide the volume 64x64x64"):
        pair.teacher_grid((64, 64, 64), 3)


@pytest.mark.slow  # three compiles; the pair command test below covers the mode by default
def test_student_step_takes_the_teacher_logits_and_grows_linearly_with_the_slice_batch():
    """The 2D step (dims=2 through train.init.model_fn) holds K x H x W float32 teacher logits per slice."""
    config = config_lib.preset("gpu", remat="", **TINY)
    shape, k = (32, 32), 3
    steps = [memory.step_memory(config, shape, 1, dims=2, num_classes=k, teacher_logits=True, batch=b) for b in (1, 2, 3)]
    assert [m.dims for m in steps] == [2, 2, 2] and [m.batch for m in steps] == [1, 2, 3]
    assert [m.teacher_bytes for m in steps] == [b * k * 32 * 32 * 4 for b in (1, 2, 3)]
    # One more slice adds its float32 image, int32 labels, K float32 teacher logits and its labelled flag.
    assert steps[1].argument_bytes - steps[0].argument_bytes == (1 + 1 + k) * 32 * 32 * 4 + 4
    # About linear in the batch: equal steps from 1 to 2 and 2 to 3 slices (XLA's buffer
    # assignment adds some slack at this tiny size), which largest_batch's first guess relies on.
    first, second = (steps[i + 1].total_bytes - steps[i].total_bytes for i in (0, 1))
    assert first > 0 and abs(second - first) <= 0.1 * first, (first, second)


def _fake_steps(monkeypatch, per_device_gib):
    """Stand-in for the compile: per-device GiB = per_device_gib(remat, devices, batch)."""

    def fake_step(config, volume, devices, *, batch=1, **_):
        remat = config.remat or "none"
        total = int(per_device_gib(remat, devices, batch) * memory.GIB)
        return memory.StepMemory(devices, remat, config.dtype, tuple(volume), 0, 0, 0, total, 0.0, batch=batch)

    monkeypatch.setattr(memory, "step_memory", fake_step)


@pytest.mark.parametrize("budget, cap", [(80.0, 2048), (81.5, 2048), (80.0, 8), (5.0, 2048), (7.0, 2048), (1e4, 2048)])
def test_largest_batch_is_exact(monkeypatch, budget, cap):
    # Slightly convex, so the line through batches 1 and 2 overshoots and the search must step back.
    gib = lambda b: 1.0 + 5.0 * b + 0.01 * b * b  # noqa: E731
    _fake_steps(monkeypatch, lambda remat, devices, b: gib(b))
    expected = max((b for b in range(1, cap + 1) if int(gib(b) * memory.GIB) <= budget * memory.GIB), default=None)
    config = config_lib.preset("gpu", remat="", **TINY)
    best, tried = memory.largest_batch(config, (32, 32), 1, budget, cap=cap)
    if expected is None:
        assert best is None and [m.batch for m in tried] == [1]
        return
    assert best.batch == expected
    by_batch = {m.batch: m for m in tried}
    assert memory.fits(by_batch[expected], budget)
    assert expected == cap or not memory.fits(by_batch[expected + 1], budget)
    assert len(tried) <= 4 + 2 * cap.bit_length()  # from the line, then bisection: never a walk
    if budget in (80.0, 81.5):  # near-linear here: the line's guess and one neighbour settle it
        assert len(tried) <= 4


def test_fewest_devices_stops_at_the_first_fit_and_skips_what_cannot_win(monkeypatch):
    """The search's rules on a stand-in for the compile: per-device GiB = work[remat] / devices."""
    work = {}
    _fake_steps(monkeypatch, lambda remat, devices, batch: work[remat] / devices)
    configs = [config_lib.preset("gpu", remat=r, **TINY) for r in ("", "nothing_saveable")]
    counts = [1, 2, 4, 8, 16]
    tried_of = lambda tried: [(m.remat, m.devices) for m in tried]  # noqa: E731

    work.update(none=100, nothing_saveable=50)
    best, tried = memory.fewest_devices(configs, (16, 16, 16), counts, 26)
    assert (best.remat, best.devices) == ("nothing_saveable", 2)
    assert tried_of(tried) == [("none", 1), ("none", 2), ("none", 4), ("nothing_saveable", 1), ("nothing_saveable", 2)]

    work.update(none=100, nothing_saveable=90)  # both fit at 4: the smaller total wins
    best, tried = memory.fewest_devices(configs, (16, 16, 16), counts, 26)
    assert (best.remat, best.devices) == ("nothing_saveable", 4)

    work.update(none=100, nothing_saveable=400)  # 8 devices cannot beat none's 4: never compiled
    best, tried = memory.fewest_devices(configs, (16, 16, 16), counts, 26)
    assert (best.remat, best.devices) == ("none", 4) and ("nothing_saveable", 8) not in tried_of(tried)

    best, tried = memory.fewest_devices(configs, (16, 16, 16), counts, 1)
    assert best is None and len(tried) == 2 * len(counts)


@pytest.mark.slow  # compiles three steps in a child process; the fake-compile tests above cover the search
def test_pair_command_at_a_small_volume():
    result = _run("--pair", "--volume", "32", "--teacher_factor", "4", "--widths", "8,16", "--remat", "none",
                  "--max_devices", "2", "--max_slice_batch", "1", "--budget_gb", "80")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    teacher = rows["3D teacher, 4x spacing"]
    student = rows["2D student, full resolution"]
    full = rows["3D network, full resolution"]
    assert teacher[1].startswith("8x8x8 ") and full[1].startswith("32x32x32 ")
    assert student[1].startswith("32x32 slices")
    assert teacher[3] == student[3] == full[3] == "1"  # 80 GiB holds everything at this size
    assert student[4] == "1"  # the largest slice batch allowed
    assert float(student[5]) == pytest.approx(3 * 32 * 32 * 4 / 1024**3, rel=0.01)  # K x H x W float32
    assert rows["pair (teacher + student)"][3] == "2"
    assert "pair: 2 devices (1 teacher + 1 student) vs 1 for the full-resolution 3D network" in result.stdout
    assert "fewer" not in result.stdout  # at this size the pair saves nothing


def test_search_command_reports_the_smallest_fit():
    result = _run("--search", "--volume", "32", "--widths", "8,16", "--remat", "none", "--max_devices", "2",
                  "--budget_gb", "80")
    assert result.returncode == 0, result.stderr
    assert "| 1 | none | bfloat16 |" in result.stdout and "| 2 | none" not in result.stdout  # stopped at the fit
    assert "smallest fit: 1 devices, remat none, bfloat16" in result.stdout


def test_pair_command_names_a_teacher_grid_the_network_cannot_take():
    result = _run("--pair", "--volume", "64", "--teacher_factor", "8", "--widths", "8,16,32,64,128",
                  "--max_devices", "1", timeout=120)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher_factor: ") and "(8, 8, 8)" in err[0], err


@pytest.mark.slow
def test_pair_needs_fewer_devices_than_the_full_3d_network_at_2048():
    """The README's settings: 2048^3 at 1 mm, a 4 mm teacher, 80 GiB per device."""
    result = _run("--pair", "--volume", "2048,2048,2048", "--teacher_factor", "4", "--budget_gb", "80",
                  "--remat", "nothing_saveable", timeout=3600)
    assert result.returncode == 0, result.stderr
    found = re.search(r"pair: (\d+) devices .* vs (\d+) for the full-resolution 3D network", result.stdout)
    assert found, result.stdout
    pair_devices, full_devices = map(int, found.groups())
    assert pair_devices < full_devices
    assert _rows(result.stdout)["3D teacher, 4x spacing"][1].startswith("512x512x512 ")
