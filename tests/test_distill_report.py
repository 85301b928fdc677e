"""train.distill_report: the runs it plans, the table, reuse of finished runs (the runs themselves are train.main's)."""

import json
import os
import sys
from pathlib import Path

import pytest
from absl import flags

from train import config as config_lib
from train import distill_report as dr


def _plan(tmp_path, **kw):
    options = dict(steps=40, teacher_steps=80, seeds=(0, 1), fractions=(1.0, 0.25), kd_weight=0.3,
                   kd_temperature=3.0)
    options.update(kw)
    return dr.plan_runs(tmp_path / "out", **options)


def _config(argv) -> config_lib.Config:
    """The Config train.main would build from ``argv``."""
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["train.main", *argv])
    return config_lib.from_flags(fv)


def test_plan_has_each_teacher_before_its_students_and_every_fraction_seed_and_arm(tmp_path):
    runs = _plan(tmp_path)
    assert len(runs) == 2 * (1 + 2 * 2 * 2)
    for direction in ("forward", "reverse"):
        mine = [r for r in runs if r.direction == direction]
        teacher = mine[0]
        assert teacher.role == "teacher" and [r.role for r in mine[1:]] == ["student"] * 8
        students = mine[1:]
        assert sorted((r.fraction, bool(r.teacher), r.seed) for r in students) == sorted(
            (f, t, s) for f in (1.0, 0.25) for t in (False, True) for s in (0, 1))
        # Every taught student names its direction's teacher; no two runs share a workdir.
        assert {r.teacher for r in students if r.teacher} == {teacher.workdir}
    assert len({r.workdir for r in runs}) == len(runs)


def test_commands_build_the_intended_configs(tmp_path):
    weights = {1.0: (0.5, 1.25, 3.0), 4.0: (0.25, 2.0, 4.5)}
    runs = _plan(tmp_path, cache_dir=str(tmp_path / "cache"), class_weights=weights)
    for r in runs:
        if r.role == "teacher":
            (tmp_path / r.workdir).mkdir(parents=True, exist_ok=True)  # --teacher must name an existing run
    for r in runs:
        command = r.command()
        assert command[:3] == [sys.executable, "-m", "train.main"]
        config = _config(command[3:])
        assert config.workdir == r.workdir and config.seed == r.seed and config.init == "scratch"
        assert config.dataset == "mni152" and config.cache_dir == str(tmp_path / "cache")
        assert config.eval_every == 0 and not config.eval_mirror  # one final validation, no mirroring
        net = dr.DIRECTIONS[r.direction][0 if r.role == "teacher" else 1]
        assert r.network == net and config.spacing == (net.spacing,) * 3
        # Fixed weights per grid: every run on it compiles the same step.
        assert config_lib.parse_class_weights(config.class_weights) == weights[net.spacing]
        assert config.model_dims == (2 if net is dr.NET_2D else 3)
        assert config.model_options == config_lib.PRESETS["demo"].model_options  # the demo's network on both sides
        if r.role == "teacher":
            assert (config.steps, config.seed, config.labelled_fraction, config.teacher) == (80, 0, 1.0, "")
        else:
            assert (config.steps, config.labelled_fraction, config.teacher) == (40, r.fraction, r.teacher)
            if r.teacher:
                assert (config.kd_weight, config.kd_temperature) == (0.3, 3.0)
    forward_teacher = next(r for r in runs if r.direction == "forward" and r.role == "teacher")
    assert forward_teacher.network is dr.NET_3D
    # The 3D teacher's patch covers a whole 4 mm training volume.
    assert all(p >= s for p, s in zip(_config(forward_teacher.argv).patch, (21, 51, 41)))
    reverse_students = [r for r in runs if r.direction == "reverse" and r.role == "student"]
    assert all(r.network is dr.NET_3D for r in reverse_students)


def test_template_class_weights_are_balanced_and_favour_the_rarer_white_matter():
    weights = dr.template_class_weights(4.0)
    assert len(weights) == 3 and weights[2] > weights[1] > 1 > weights[0] > 0


def test_cases_read_are_the_teachers_seed_on_its_grid_and_every_seed_on_the_students():
    assert dr.cases_read(["forward"], [1, 2]) == {1.0: [1, 2], 4.0: [0]}
    assert dr.cases_read(["forward", "reverse"], [1, 2]) == {1.0: [0, 1, 2], 4.0: [0, 1, 2]}


def test_taught_runs_of_a_seed_share_the_teacher_logits_of_the_first(tmp_path):
    from train import distill

    assert (dr.TEACHER_DIR, dr.TEACHER_RECORD) == (distill.TEACHER_DIR, distill._RECORD)
    runs = [r for r in _plan(tmp_path, fractions=(1.0, 0.25, 0.1)) if r.direction == "forward" and r.teacher]
    by = {(r.fraction, r.seed): r for r in runs}
    assert by[1.0, 0].logits_from == () and by[0.1, 1].logits_from == (by[1.0, 1].workdir, by[0.25, 1].workdir)
    first, later = Path(by[1.0, 0].workdir), Path(by[0.25, 0].workdir)
    (first / "teacher").mkdir(parents=True)
    (first / "teacher" / "case_000.npy").write_bytes(b"logits")
    (first / "teacher" / "teacher.json").write_text("{}")
    assert dr.share_teacher_logits(later, [str(first)]) is None  # not finished: its logits may be partial
    (first / "summary.json").write_text("{}")
    assert dr.share_teacher_logits(later, [str(first)]) == str(first)
    linked = later / "teacher" / "case_000.npy"
    assert linked.read_bytes() == b"logits" and linked.samefile(first / "teacher" / "case_000.npy")
    assert (later / "teacher" / "teacher.json").read_text() == "{}"
    assert not (later / "teacher" / "teacher.json").samefile(first / "teacher" / "teacher.json")
    assert dr.share_teacher_logits(later, [str(first)]) is None  # it has its own now


def _summary(dice, **kw):
    return {"val_dice_mean": dice, "training_cases": 24, "baseline_threshold_dice": 0.4, **kw}


def _row(direction, role, fraction, taught, seed, dice, wall=10.0, mb=100.0):
    net = dr.DIRECTIONS[direction][0 if role == "teacher" else 1]
    return {"direction": direction, "role": role, "network": net.name, "fraction": fraction, "seed": seed,
            "taught": taught, "summary": _summary(dice), "resources": {"wall_s": wall, "peak_rss_mb": mb}}


def test_table_means_over_seeds_and_pairs_the_teacher_effect_by_seed():
    results = [
        _row("forward", "teacher", 1.0, False, 0, 0.7, wall=50, mb=900),
        _row("forward", "student", 0.25, False, 0, 0.5, wall=10, mb=300),
        _row("forward", "student", 0.25, False, 1, 0.7, wall=20, mb=500),
        _row("forward", "student", 0.25, False, 2, 0.6, wall=90, mb=250),
        _row("forward", "student", 0.25, True, 0, 0.6),
        _row("forward", "student", 0.25, True, 1, 0.6),
        _row("forward", "student", 0.1, False, 0, 0.5),
        _row("forward", "student", 0.1, True, 0, 0.4),
    ]
    text = dr.table(results)
    rows = [line for line in text.splitlines() if line.startswith("| forward")]
    assert rows[0] == f"| forward | teacher: {dr.NET_3D.name} | 1 (24/24) | - | 1 | 0.700 |  | 50 | 900 |"
    # Times and memories are medians over seeds (the run that compiled is an outlier).
    assert rows[1] == f"| forward | {dr.NET_2D.name} | 0.25 (6/24) | no | 3 | 0.600 ± 0.100 |  | 20 | 300 |"
    # Paired by seed: +0.1 and -0.1, mean 0 with their spread.
    taught = f"| forward | {dr.NET_2D.name} | 0.25 (6/24) | yes | 2 | 0.600 ± 0.000 | +0.000 ± 0.141 | 10 | 100 |"
    assert rows[2] == taught
    # A teacher that hurts is shown as such.
    assert rows[4].split(" | ")[6] == "-0.100"
    assert f"({dr.NET_2D.name}): 0.400" in text


def test_table_without_resources_shows_dashes():
    row = _row("reverse", "student", 1.0, False, 0, 0.5)
    row["resources"] = None
    line = next(x for x in dr.table([row]).splitlines() if x.startswith("| reverse"))
    assert line.endswith("| - | - |")


def _fake_runner(calls):
    def run(command, log_path):
        calls.append(command)
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        steps = int(next(a.split("=", 1)[1] for a in command if a.startswith("--steps=")))
        fraction = float(next((a.split("=", 1)[1] for a in command if a.startswith("--labelled_fraction=")), 1))
        with open(f"{workdir}/summary.json", "w") as f:
            json.dump(_summary(0.5, steps=steps, labelled_fraction=fraction), f)
        log_path.write_text("ok\n")
        return {"returncode": 0, "wall_s": 3.0, "peak_rss_mb": 250.0}
    return run


def test_finished_runs_are_reused_and_other_settings_refused(tmp_path):
    runs = _plan(tmp_path, seeds=(0,), fractions=(0.5,))
    calls = []
    first = [dr.execute(r, _fake_runner(calls), log=lambda m: None) for r in runs]
    assert len(calls) == len(runs) == 6
    assert all(r["resources"]["peak_rss_mb"] == 250.0 for r in first)
    again = [dr.execute(r, _fake_runner(calls), log=lambda m: None) for r in runs]
    assert len(calls) == 6 and again == first  # nothing retrained, the same rows
    other = _plan(tmp_path, seeds=(0,), fractions=(0.5,), steps=41)
    with pytest.raises(config_lib.ConfigError, match="steps=40, not 41"):
        dr.execute(other[1], _fake_runner(calls), log=lambda m: None)


def test_failed_run_names_its_log(tmp_path):
    run = _plan(tmp_path)[0]
    with pytest.raises(RuntimeError, match="status 3; see .*log.txt"):
        dr.execute(run, lambda c, p: {"returncode": 3, "wall_s": 1.0, "peak_rss_mb": 1.0}, log=lambda m: None)


def test_run_process_measures_its_own_child(tmp_path):
    # A child that holds ~200 MB for a moment: its own peak, not the test process's (which holds JAX).
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; time.sleep(0.5)"
    small = dr.run_process([sys.executable, "-c", "pass"], tmp_path / "a.txt")
    big = dr.run_process([sys.executable, "-c", code], tmp_path / "b.txt")
    assert small["returncode"] == big["returncode"] == 0
    assert big["peak_rss_mb"] > 200 > small["peak_rss_mb"]
    assert dr.run_process([sys.executable, "-c", "raise SystemExit(4)"], tmp_path / "c.txt")["returncode"] == 4


def test_main_writes_the_report_and_reuses_runs(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(dr, "run_process", _fake_runner(calls))
    monkeypatch.setattr(dr, "warm_cache", lambda *a: 0.0)
    monkeypatch.setattr(dr, "template_class_weights", lambda spacing: (0.5, 1.5, 3.0))
    argv = ["--out", str(tmp_path / "out"), "--steps=5", "--teacher_steps=7", "--seeds=0,1", "--fractions=1,0.1"]
    assert dr.main(argv) == 0
    assert len(calls) == 2 * (1 + 2 * 2 * 2)
    text = (tmp_path / "out" / "distillation.md").read_text()
    assert "students 5 steps, teachers 7" in text and text.count("| reverse |") == 5
    assert all("--class_weights=0.5,1.5,3" in c for c in calls)
    assert dr.main(argv) == 0 and len(calls) == 18


def test_bad_flags_are_one_line_errors(capsys):
    assert dr.main(["--fractions=0.5,2"]) == 2
    assert dr.main(["--directions=sideways"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --fractions: every fraction must be in (0, 1], got '0.5,2'",
                   "error: --directions: expected forward and/or reverse, got 'sideways'"]


@pytest.mark.slow
def test_real_runs_end_to_end(tmp_path, capsys):
    # Three real train.main processes (a 3D teacher at 4 mm, a 2D student at 1 mm alone and taught), a few
    # steps each; about 7 minutes on two busy CPU cores, mostly rendering the 1 mm cases and compiling.
    out = tmp_path / "out"
    argv = ["--out", str(out), "--steps=2", "--teacher_steps=2", "--seeds=0", "--fractions=0.1",
            "--directions=forward"]
    assert dr.main(argv) == 0
    taught = json.loads((out / "forward" / "f0.1-taught" / "seed0" / "summary.json").read_text())
    alone = json.loads((out / "forward" / "f0.1-alone" / "seed0" / "summary.json").read_text())
    assert taught["teacher"]["workdir"] == os.path.abspath(out / "forward" / "teacher")
    assert taught["labelled_fraction"] == 0.1 and taught["kd_weight"] == 0.5
    assert alone["labelled_cases"] == dr.labelled_cases(0.1, alone["training_cases"])
    for summary in (taught, alone):
        assert 0 <= summary["val_dice_mean"] <= 1 and summary["dims"] == 2
    resources = json.loads((out / "forward" / "teacher" / "resources.json").read_text())
    assert resources["returncode"] == 0 and resources["peak_rss_mb"] > 100 and resources["wall_s"] > 0
    text = (out / "distillation.md").read_text()
    assert text.count("| forward |") == 3 and "teacher: 3D U-Net" in text
