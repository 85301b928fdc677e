"""train.compare: variant expansion and the comparison table (the runs themselves are the trainer's tests)."""

from train import compare


def test_variants_skip_sources_for_scratch_and_put_imagenet_on_its_encoder():
    lite = compare.IMAGENET_MODEL
    assert compare.variants(["scratch", "scale", "acs"], ["slices", "imagenet"]) == [
        ("scratch", "", "unet"), ("scratch", "", lite),
        ("scale", "slices", "unet"), ("scale", "imagenet", lite), ("acs", "slices", "unet"), ("acs", "imagenet", lite),
    ]
    assert compare.variants(["scratch", "acs"], ["slices"]) == [("scratch", "", "unet"), ("acs", "slices", "unet")]
    assert compare.variant_name("scratch", "", lite, "unet") == f"scratch ({lite})"
    assert compare.variant_name("acs", "imagenet", lite, "unet") == "acs-imagenet"
    assert compare.variant_name("scale", "slices", "unet", "unet") == "scale-slices"


def _run(name, seed, curve, wall=10.0, params=100, baseline=0.5):
    return {"name": name, "seed": seed, "curve": curve, "params": params,
            "summary": {"wall_s": wall, "baseline_threshold_dice": baseline}}


def test_table_means_over_seeds_and_steps_to_threshold(tmp_path):
    results = [
        _run("scratch", 0, [(10, 0.5), (20, 0.7)]),
        _run("scratch", 1, [(10, 0.7), (20, 0.9)], wall=20.0),
        _run("scale-slices", 0, [(10, 0.85), (20, 0.9)], params=1234),
    ]
    text = compare.table(results, 0.8)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| scratch | 2 | 0.600 ± 0.141 | 0.800 ± 0.141 | 20 (1/2) | 15 | 100 |" in rows["scratch"]
    assert "| scale-slices | 1 | 0.850 | 0.900 | 10 (1/1) | 10 | 1,234 |" in rows["scale-slices"]
    assert "threshold Dice on the same validation cases: 0.500" in text
    compare.plot(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_base_config_keeps_the_preset_unless_overridden_and_never_mirrors():
    base = compare.base_config("demo")
    assert base.class_weights == "balanced" and base.steps == 1500
    assert base.eval_every == base.checkpoint_every == 375
    assert not base.eval_mirror  # the demo mirrors its final validation; curves must not
    base = compare.base_config("demo", steps=400, class_weights="none", eval_every=100, model="resnet18_unet")
    assert (base.steps, base.class_weights, base.eval_every, base.model) == (400, "none", 100, "resnet18_unet")


# --------------------------------------------------------------------------
# Labelled fractions and equal compute (runs faked: the trainer has its own tests)

import json  # noqa: E402

import pytest  # noqa: E402

from train import label_fractions, run  # noqa: E402

STAGE_S = {"slices": 40.0, "vdt": 60.0}
FIXED_S, PER_STEP_S = 10.0, 0.5


def _fake_train(calls, task):
    """A stand-in for run.train_and_evaluate: deterministic scores, a 2D stage of known cost, metrics.csv rows."""
    from pathlib import Path

    def train(config):
        workdir = Path(config.workdir)
        calls.append(config)
        wall = FIXED_S + PER_STEP_S * config.steps
        source = config.pretrained.split(":")[0]
        if source == "slices" and not (workdir / "slices2d").exists():
            (workdir / "slices2d").mkdir(parents=True)
            (workdir / "slices_metrics.csv").write_text(f"step,loss,wall_s\n3,1.0,{STAGE_S['slices']}\n")
            wall += STAGE_S["slices"]
        if source == "vdt" and not (workdir / "vdt").exists():
            (workdir / "vdt").mkdir(parents=True)
            (workdir / "vdt" / "vdt.json").write_text(json.dumps({"wall_s": STAGE_S["vdt"]}))
            wall += STAGE_S["vdt"]
        score = 0.5 + 0.1 * config.labelled_fraction + 0.01 * config.seed + (0.05 if config.init != "scratch" else 0)
        kind = "val_balanced_accuracy" if task == "classification" else "val_dice_mean"
        # Training rows every 2 steps at PER_STEP_S (after 5 s of compilation); one validation row at the end.
        rows = [f"{s},1.0,{5 + PER_STEP_S * s}," for s in range(2, config.steps + 1, 2)]
        rows.append(f"{config.steps},,,{score}")
        (workdir / "metrics.csv").write_text(f"step,loss,wall_s,{kind}\n" + "\n".join(rows) + "\n")
        summary = {"task": task, "init": config.init, "steps": config.steps, "wall_s": wall, "seed": config.seed,
                   "labelled_fraction": config.labelled_fraction, "training_cases": 40,
                   "labelled_cases": max(1, round(40 * config.labelled_fraction))}
        if task == "classification":
            summary.update(val_balanced_accuracy=score, val_accuracy=score - 0.01, val_auc=score + 0.2,
                           baseline_accuracy=0.25)
        else:
            summary.update(val_dice_mean=score, baseline_threshold_dice=0.5)
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    return train


@pytest.fixture
def fake_runs(monkeypatch):
    def install(task):
        calls = []
        monkeypatch.setattr(run, "train_and_evaluate", _fake_train(calls, task))
        monkeypatch.setattr(run, "select_task", lambda config: compare.tasks.get(task))
        monkeypatch.setattr(compare, "_param_count", lambda config: 100)
        return calls

    return install


def test_fraction_list_sorts_and_rejects_fractions_outside_0_1():
    import argparse

    assert label_fractions.fraction_list("1,0.1,0.25,0.1") == (0.1, 0.25, 1.0)
    for bad in ("0", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            label_fractions.fraction_list(bad)


def test_run_dir_keeps_todays_paths_for_one_fraction():
    from pathlib import Path

    out = Path("o")
    assert compare.run_dir(out, "scale-slices", 2) == out / "scale-slices" / "seed2"
    assert compare.run_dir(out, "scale-slices", 2, 0.25, nested=True) == out / "scale-slices" / "frac0.25" / "seed2"
    assert compare.run_dir(out, "scratch (equal compute)", 0, 1.0, True) == out / "scratch_equal_compute" / "frac1" / "seed0"


def test_task_metrics_come_from_the_task():
    assert label_fractions.metrics_of("segmentation") == ["val_dice_mean"]
    assert label_fractions.metrics_of("classification") == ["val_balanced_accuracy", "val_accuracy", "val_auc"]
    assert label_fractions.baseline_of("classification") == "baseline_accuracy"
    assert label_fractions.baseline_of("segmentation") == "baseline_threshold_dice"


def test_variants_put_classification_imagenet_on_the_classifier_and_vdt_of_a_plain_unet_on_its_encoder():
    assert compare.variants(["scratch", "scale"], ["slices", "imagenet", "vdt:digits"], "resnet18", "classification") == [
        ("scratch", "", "resnet18"), ("scratch", "", "efficientnet_lite0"), ("scale", "slices", "resnet18"),
        ("scale", "imagenet", "efficientnet_lite0"), ("scale", "vdt:digits", "resnet18"),
    ]
    lite = compare.IMAGENET_MODEL
    assert compare.variants(["scratch", "scale"], ["vdt:digits"]) == [
        ("scratch", "", "unet"), ("scratch", "", lite), ("scale", "vdt:digits", lite)]


def test_step_cost_and_equal_compute_steps():
    # Rows at steps 10..40 at 0.5 s a step after compilation; the rest of the 45 s is fixed.
    per_step, fixed = label_fractions.step_cost([(10, 15.0), (20, 20.0), (40, 30.0)], 40, 45.0)
    assert per_step == pytest.approx(0.5) and fixed == pytest.approx(25.0)
    assert label_fractions.equal_compute_steps(per_step, fixed, 100.0, 40) == 150
    assert label_fractions.equal_compute_steps(per_step, fixed, 30.0, 40) == 40  # never fewer than the base
    assert label_fractions.step_cost([], 10, 20.0) == (2.0, 0.0)


def _table_rows(text, heading):
    part = text.split(f"### {heading}")[1].split("###")[0]
    return {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("| ")}


def test_label_fractions_classification_tables_equal_compute_and_plot(tmp_path, fake_runs):
    calls = fake_runs("classification")
    argv = ["--preset=classify", "--inits=scratch,scale,acs", "--pretrained=slices,vdt:digits", "--seeds=0,1",
            "--label_fractions=0.5,0.1", "--steps=20", "--equal_compute", f"--out={tmp_path}"]
    assert compare.main(argv) == 0
    for name in ("scratch", "scale-slices", "acs-slices", "scale-vdt:digits"):
        for frac in ("0.1", "0.5"):
            assert (tmp_path / name / f"frac{frac}" / "seed1" / "summary.json").exists(), (name, frac)
    assert not (tmp_path / "acs-vdt:digits").exists()  # VDT pre-trains full 3D kernels: acs cannot take it
    # The 2D slice parent is trained once per fraction and seed, VDT once per seed (it sees no 3D labels).
    assert sorted(p.name for p in tmp_path.glob("slices2d-*") if p.is_dir()) == [
        "slices2d-resnet18-frac0.1-seed0", "slices2d-resnet18-frac0.1-seed1",
        "slices2d-resnet18-frac0.5-seed0", "slices2d-resnet18-frac0.5-seed1"]
    assert (tmp_path / "acs-slices" / "frac0.1" / "seed0" / compare.STAGE_REUSED).exists()
    assert (tmp_path / "scale-vdt:digits" / "frac0.5" / "seed0" / compare.STAGE_REUSED).exists()
    # Most expensive pretrained variant: VDT, 10 + 0.5 * 20 + 60 = 80 s -> scratch gets (80 - 10) / 0.5 steps.
    equal = [c for c in calls if "equal" in c.workdir]
    assert len(equal) == 4 and {c.steps for c in equal} == {140}
    assert {c.labelled_fraction for c in calls} == {0.1, 0.5}

    text = (tmp_path / "label_fractions.md").read_text()
    rows = _table_rows(text, "val_balanced_accuracy")
    # scratch at 0.1: 0.51 and 0.52 over seeds 0, 1; at 0.5: 0.55, 0.56; total 10 + 0.5 * 20 = 20 s.
    assert rows["scratch"] == ["scratch", "2", "0.515 ± 0.007", "0.555 ± 0.007", "20"]
    # Every slices variant is charged its 2D stage (40 s), paid or reused.
    assert rows["acs-slices"][-1] == "60" and rows["scale-vdt:digits"][-1] == "80"
    assert rows["scratch (equal compute)"][2:] == ["0.515 ± 0.007", "0.555 ± 0.007", "80"]
    assert rows["no network (baseline_accuracy)"][2:4] == ["0.250", "0.250"]
    assert "0.1 (4 cases)" in text and "0.5 (20 cases)" in text
    assert _table_rows(text, "val_auc")["scale-slices"][2] == "0.765 ± 0.007"
    compute = _table_rows(text, "Compute")
    assert compute["scratch (equal compute)"][1] == "80 s (target 80 s), 140 steps"
    assert compute["acs-slices"][1] == "60 s (2D stage 40 s), 20 steps"
    assert (tmp_path / "label_fractions.png").stat().st_size > 1000
    # comparison.md describes the largest fraction with the task's score.
    assert "balanced_accuracy @20" in (tmp_path / "comparison.md").read_text()

    # A rerun reuses every finished run.
    before = len(calls)
    assert compare.main(argv) == 0
    assert len(calls) == before


def test_one_fraction_keeps_todays_layout_and_outputs(tmp_path, fake_runs):
    calls = fake_runs("segmentation")
    assert compare.main(["--preset=cpu-tiny", "--inits=scratch,scale", "--pretrained=slices", f"--out={tmp_path}"]) == 0
    assert (tmp_path / "scratch" / "seed0" / "summary.json").exists()
    assert (tmp_path / "scale-slices" / "seed0" / "summary.json").exists()
    assert (tmp_path / "slices2d-unet-seed0").is_dir()
    assert {c.labelled_fraction for c in calls} == {1.0}
    assert (tmp_path / "comparison.md").exists() and (tmp_path / "learning_curves.png").exists()
    assert not (tmp_path / "label_fractions.md").exists()
    assert "| scratch | 1 | 0.600 |" in (tmp_path / "comparison.md").read_text()


@pytest.mark.slow
def test_label_fractions_end_to_end_on_cpu_tiny(tmp_path, monkeypatch):
    """Real runs: two fractions, one seed, scratch and slices, equal compute."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert compare.main(["--preset=cpu-tiny", "--inits=scratch,scale", "--pretrained=slices", "--steps=4",
                         "--label_fractions=0.5,1", "--equal_compute", f"--out={out}"]) == 0
    for frac in ("0.5", "1"):
        summary = json.loads((out / "scale-slices" / f"frac{frac}" / "seed0" / "summary.json").read_text())
        assert summary["labelled_fraction"] == float(frac)
        assert summary["labelled_cases"] <= summary["training_cases"]
        equal = json.loads((out / "scratch_equal_compute" / f"frac{frac}" / "seed0" / "summary.json").read_text())
        assert equal["steps"] >= 4
    assert (out / "slices2d-unet-frac0.5-seed0").is_dir() and (out / "slices2d-unet-seed0").is_dir()
    text = (out / "label_fractions.md").read_text()
    assert "### val_dice_mean" in text and "target" in text
    assert (out / "label_fractions.png").stat().st_size > 1000
