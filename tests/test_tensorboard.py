"""TensorBoard event files: scalars, images, resumed runs, and Progress writing both CSV and events."""

import io

import numpy as np
import pytest

from train import tensorboard as tb
from train.trainer import Progress


def _png(path, array):
    import matplotlib.image

    matplotlib.image.imsave(path, array)
    return path


def _decode(data: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def _images(logdir) -> dict[str, list]:
    out = {}
    for event in tb.read_events(logdir):
        for value in event.summary.value:
            if value.HasField("image"):
                out.setdefault(value.tag, []).append((event.step, value.image))
    return out


def test_scalars_and_images_read_back(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    png = _png(tmp_path / "figure.png", rng.random((7, 5, 3)))
    board = tb.Board(tmp_path / "run", enabled=True)
    for step in (1, 2, 5):
        board.scalars(step, {"train/loss": 1.0 / step, "val/dice_mean": None, "val/dice/organ": 0.1 * step})
    board.image("val/overlay", png, 5)
    board.image("rgb", rgb, 2)
    grey = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    board.image("grey", grey, 3)
    board.close()

    scalars = tb.read_scalars(tmp_path / "run")
    assert set(scalars) == {"train/loss", "val/dice/organ"}  # None is skipped
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 5]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [1.0, 0.5, 0.2], rtol=1e-6)  # float32
    np.testing.assert_allclose([v for _, v in scalars["val/dice/organ"]], [0.1, 0.2, 0.5], rtol=1e-6)

    images = _images(tmp_path / "run")
    assert set(images) == {"val/overlay", "rgb", "grey"}
    (step, overlay), = images["val/overlay"]
    assert step == 5 and (overlay.height, overlay.width, overlay.colorspace) == (7, 5, 4)  # imsave writes RGBA
    assert overlay.encoded_image_string == png.read_bytes()  # the file as it is, not re-encoded
    (step, image), = images["rgb"]
    assert step == 2 and (image.height, image.width, image.colorspace) == (6, 10, 3)
    np.testing.assert_array_equal((_decode(image.encoded_image_string) * 255).round().astype(np.uint8), rgb)
    (step, image), = images["grey"]
    assert step == 3 and (image.height, image.width, image.colorspace) == (3, 4, 3)  # grey stored as RGB
    decoded = (_decode(image.encoded_image_string) * 255).round().astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], (grey * 255).astype(np.uint8))


def test_a_resumed_run_replaces_the_replayed_steps(tmp_path):
    """Killed after step 5, resumed from the checkpoint at step 2: steps 3.. come from the new file."""
    first = tb.Board(tmp_path, enabled=True)
    for step in range(1, 6):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    second = tb.Board(tmp_path, start=2, enabled=True)
    for step in (3, 4):
        second.scalars(step, {"train/loss": 10.0 * step})
    second.close()
    assert len(list(tmp_path.glob(tb.EVENT_GLOB))) == 2  # a restart within a second keeps both files
    assert tb.read_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    restarts = [e.step for e in tb.read_events(tmp_path) if e.HasField("session_log")]
    assert restarts == [3]


def test_tensorboard_itself_reads_the_files(tmp_path):
    """TensorBoard's own loader (only where the viewer is installed) sees the same points."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tb.Board(tmp_path, enabled=True)
    for step in range(1, 6):
        first.scalars(step, {"train/loss": float(step)})
    first.image("val/overlay", _png(tmp_path / "f.png", np.zeros((4, 6, 3))), 5)
    first.close()
    second = tb.Board(tmp_path, start=2, enabled=True)
    second.scalars(3, {"train/loss": 30.0})
    second.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert acc.Images("val/overlay") == []  # the restart at step 3 hid the image of step 5 too


def test_other_processes_write_nothing(tmp_path):
    board = tb.Board(tmp_path / "run", enabled=False)
    board.scalars(1, {"a": 1.0})
    board.image("b", np.zeros((2, 2)), 1)
    board.close()
    assert not (tmp_path / "run").exists()


def test_bad_inputs_name_what_is_wrong(tmp_path):
    board = tb.Board(tmp_path, enabled=True)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png: not a PNG"):
        board.image("x", tmp_path / "x.png", 1)
    with pytest.raises(ValueError, match="expected"):
        board.image("x", np.zeros((2, 2, 2)), 1)
    board.scalars(1, {"a": 1.0})
    board.close()
    (path,) = tmp_path.glob(tb.EVENT_GLOB)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record's body
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt record"):
        list(tb.read_events(tmp_path))
    path.write_bytes(bytes(data[:-3]))  # cut off mid-record: a file still being written
    assert tb.read_scalars(tmp_path) == {}


def test_progress_writes_training_and_validation_scalars(tmp_path):
    progress = Progress(name="train", total=4, voxels_per_step=8, csv_path=tmp_path / "metrics.csv", start=0,
                        tensorboard=tmp_path / "tb")
    fields = ("loss", "dice", "ce", "dice_loss", "grad_norm", "lr")
    for step in (1, 2):
        progress.add(step, {k: np.float32(step + i / 10) for i, k in enumerate(fields)})
        progress.flush(step, print_line=False)
    progress.validation(2, {"val_dice_mean": 0.5, "val_dice": {"grey": 0.4, "white": 0.6},
                            "baseline_threshold_dice": None})
    progress.close()
    scalars = tb.read_scalars(tmp_path / "tb")
    train = {f"train/{k}" for k in (*fields, "voxels_per_s")}
    assert set(scalars) == train | {"val/dice_mean", "val/dice/grey", "val/dice/white"}
    for i, k in enumerate(fields):
        np.testing.assert_allclose(scalars[f"train/{k}"], [(1, 1 + i / 10), (2, 2 + i / 10)], rtol=1e-6)
    assert scalars["val/dice_mean"] == [(2, 0.5)]
    np.testing.assert_allclose(scalars["val/dice/white"], [(2, 0.6)], rtol=1e-6)
    assert all(v > 0 for _, v in scalars["train/voxels_per_s"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 1  # the CSV is written as before
