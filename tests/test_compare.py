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
