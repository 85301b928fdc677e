"""Labelled 2D images as depth-3 volumes, for VDT pre-training.

VDT (Zhang et al., 2022, "Variable Dimension Transform based supervised 3D
pre-training") trains a 3D network with one input channel on 2D labelled
images by reading an RGB image as a volume of depth 3: the colour channels
become slices, their order permuted at random per sample, and one mean and
standard deviation normalise all slices together. :func:`vdt_volume` is that
reformulation; :func:`vdt_dataset` the grain pipeline around it.

Grey images become three identical slices, so every source yields volumes of
depth 3 and one network takes them all. With a single slice a 3x3x3 kernel's
outer depth taps would see only the zero padding and learn nothing from grey
data; with three equal slices every tap sees the image, the way a 2D image
repeated along depth trains inflated 3D kernels (I3D's "boring video").

Sources (random access: ``len(source)``, ``source[i] -> {'image': float32
(3, H, W) in [0, 1], slices as depth, channel order R, G, B, 'label': int}``,
and ``num_classes``, ``class_names``):

- ``digits``: scikit-learn's handwritten digits, 1797 8x8 grey images of 10
  classes, shipped inside the scikit-learn wheel (no download). scikit-learn
  is already installed as a dependency of nilearn (which ships the MNI152
  template), so it costs nothing; it is listed explicitly because this module
  imports it. Ten classes make a real classification pre-training task,
  unlike the two of the alternative below.
- ``lfw``: scikit-image's ``lfw_subset``, 200 25x25 grey crops, 100 faces
  (class 1) and 100 non-faces (class 0); needs scikit-image (the ``test``
  extra), so it is the second choice.
- ``folder:PATH``: ImageNet's layout, one subfolder of PNG/JPEG images per
  class (class names are the subfolder names, sorted). If ``PATH/train`` and
  ``PATH/val`` both exist they are the splits; otherwise the images are split
  by a hash of their path relative to ``PATH``, as :mod:`train.data.sources`
  splits cases. Read with Pillow (a dependency of matplotlib).

The built-in sets split deterministically: every fifth image (index % 5 == 0)
is validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import grain
import numpy as np
from scipy import ndimage

from train.data.pipeline import EpochShuffle, to_iter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val")


def _size2(size, name: str = "size") -> tuple[int, int] | None:
    if size is None:
        return None
    values = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or two positive ints (H, W), got {size!r}")
    return int(values[0]), int(values[1])


def to_slices(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) -> (3, H, W) float32; grey repeated to 3 slices."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


def resize_slices(volume: np.ndarray, size) -> np.ndarray:
    """Resizes each slice of (D, H, W) to `size` (H, W), linear, voxel edges aligned.

    Shrinking first blurs with the variance of the shrink factor's box, so
    large photographs do not alias.
    """
    size = _size2(size)
    if volume.shape[1:] == size:
        return volume
    factors = np.array([n / o for n, o in zip(size, volume.shape[1:])])
    sigma = np.sqrt(np.maximum(1 / factors**2 - 1, 0) / 12)
    if sigma.any():
        volume = ndimage.gaussian_filter(volume, (0, *sigma), mode="nearest")
    out = ndimage.zoom(volume, (1, *factors), order=1, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape[1:] != size:
        raise AssertionError(f"resize produced {out.shape}, wanted (.., {size})")
    return out.astype(np.float32, copy=False)


def vdt_volume(image_hwc: np.ndarray, rng: np.random.Generator, *, eps: float = 1e-6) -> np.ndarray:
    """The VDT reformulation of one 2D image: (D, H, W, 1) float32 with D = 3.

    Channels become slices in an order drawn from `rng` (a permutation is
    drawn for grey images too, so the generator advances the same way for
    every image); grey images become three identical slices (see the module
    docstring). One mean and one standard deviation over the whole volume
    normalise it to mean 0 and standard deviation 1 (a constant image gives
    zeros).

    Args:
      image_hwc: (H, W), (H, W, 1) or (H, W, 3) intensities.
      rng: the generator; the output is a pure function of the image and it.
    """
    volume = to_slices(image_hwc)[rng.permutation(3)]
    volume = volume - volume.mean()
    std = float(volume.std())
    volume = volume / std if std > eps else np.zeros_like(volume)
    return volume[..., None].astype(np.float32)


class ArraySource:
    """A source over in-memory images (N, H, W[, C]) and labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, size=None,
                 name: str = "arrays", mirror_invariant: bool = True):
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.size = _size2(size)
        self.name = name
        # Whether a left-right mirror image keeps its class (not for digits).
        self.mirror_invariant = bool(mirror_invariant)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        volume = to_slices(self.images[int(index)])
        if self.size is not None:
            volume = resize_slices(volume, self.size)
        return {"image": volume, "label": int(self.labels[int(index)])}

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} images, {self.num_classes} classes, size={self.size})"


def _builtin_split(n: int, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    val = np.arange(n) % 5 == 0
    return np.flatnonzero(val if split == "val" else ~val)


def digits_source(split: str = "train", *, size=None) -> ArraySource:
    """scikit-learn's 8x8 digits, intensities 0..16 scaled to [0, 1]; 10 classes."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    data = load_digits()
    keep = _builtin_split(len(data.target), split)
    return ArraySource(data.images[keep] / 16.0, data.target[keep], [str(i) for i in range(10)], size=size,
                       name=f"digits[{split}]", mirror_invariant=False)


def lfw_source(split: str = "train", *, size=None) -> ArraySource:
    """scikit-image's 25x25 faces (class 1) and non-faces (class 0), in [0, 1]."""
    try:
        from skimage import data  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise ValueError("the lfw image source needs scikit-image (pip install scikit-image)") from exc
    images = data.lfw_subset()  # 100 faces, then 100 non-faces
    labels = np.r_[np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)]
    keep = _builtin_split(len(images), split)
    return ArraySource(images[keep], labels[keep], ("non_face", "face"), size=size, name=f"lfw[{split}]")


def _read_image(path: str) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB float32 in [0, 1]; one-line ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode.startswith("I"):  # 16- or 32-bit grey
                return np.asarray(img, np.float32) / 65535.0
            if mode == "F":
                return np.asarray(img, np.float32)
            if mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"), np.float32) / 255.0
            return np.asarray(img.convert("RGB"), np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None


class FolderImageSource:
    """ImageNet layout: ``ROOT/CLASS/*.png|jpg|jpeg`` (see the module docstring).

    Args:
      root: the folder.
      split: 'train' or 'val'.
      size: resize every image to (H, W) (or a square); None keeps each
        image's own size (batching then needs equal sizes).
      val_fraction: share of images for 'val' when there are no train/ and
        val/ subfolders.
    """

    def __init__(self, root: str, split: str = "train", *, size=None, val_fraction: float = 0.2):
        root = os.path.expanduser(os.fspath(root))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not os.path.isdir(root):
            raise ValueError(f"folder:{root}: not a directory")
        split_dirs = all(os.path.isdir(os.path.join(root, s)) for s in SPLITS)
        base = os.path.join(root, split) if split_dirs else root
        classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        if not classes:
            raise ValueError(f"folder:{base}: no class subfolders (expected ImageNet layout CLASS/IMAGE.png)")
        files, labels = [], []
        for index, cls in enumerate(classes):
            folder = os.path.join(base, cls)
            found = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ValueError(f"folder:{folder}: no .png, .jpg or .jpeg images in class folder {cls!r}")
            files += [os.path.join(folder, f) for f in found]
            labels += [index] * len(found)
        if not split_dirs:
            if not 0.0 <= val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
            # The split depends only on the relative paths: the same on every run.
            digest = [hashlib.sha1(os.path.relpath(f, root).encode()).hexdigest() for f in files]
            order = np.argsort(digest, kind="stable")
            n_val = int(round(val_fraction * len(files)))
            in_val = np.zeros(len(files), bool)
            in_val[order[:n_val]] = True
            keep = np.flatnonzero(in_val if split == "val" else ~in_val)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise ValueError(f"folder:{root}: no images in split {split!r}")
        self.root, self.split = root, split
        self.files, self.labels = files, np.array(labels, np.int64)
        self.class_names = tuple(classes)
        self.num_classes = len(classes)
        self.size = _size2(size)
        self.mirror_invariant = True  # natural images, as ImageNet training assumes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        volume = to_slices(_read_image(self.files[int(index)]))
        if self.size is not None:
            volume = resize_slices(volume, self.size)
        return {"image": volume, "label": int(self.labels[int(index)])}

    def __repr__(self) -> str:
        return f"FolderImageSource({self.root!r}, split={self.split!r}, {len(self)} images)"


def make_image_source(spec: str, split: str = "train", *, size=None):
    """'digits', 'lfw' or 'folder:PATH' -> a source of (3, H, W) volumes and labels."""
    kind, _, path = str(spec).partition(":")
    if kind == "digits" and not path:
        return digits_source(split, size=size)
    if kind == "lfw" and not path:
        return lfw_source(split, size=size)
    if kind == "folder" and path:
        return FolderImageSource(path, split, size=size)
    raise ValueError(f"unknown 2D image source {spec!r}; expected 'digits', 'lfw' or 'folder:PATH'")


@dataclasses.dataclass(frozen=True)
class Augment2D:
    """Label-preserving 2D augmentations applied before the VDT reformulation.

    Attributes:
      flip: mirror left-right with probability 1/2 (label-preserving for
        natural images and faces, not for digits).
      shift: largest translation as a fraction of the size (edge-padded).
    """

    flip: bool = True
    shift: float = 0.125


class VDTSample(grain.transforms.RandomMap):
    """(3, H, W) image -> ``{'image': (3, H, W, 1) normalised, 'label': int32}``."""

    def __init__(self, size, augment: Augment2D | None):
        self.size = _size2(size)
        self.augment = augment

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        volume = np.asarray(sample["image"], np.float32)
        if self.size is not None and volume.shape[1:] != self.size:
            volume = resize_slices(volume, self.size)
        if self.augment is not None:
            if self.augment.flip and rng.random() < 0.5:
                volume = volume[:, :, ::-1]
            h, w = volume.shape[1:]
            ph, pw = int(self.augment.shift * h), int(self.augment.shift * w)
            if ph or pw:
                padded = np.pad(volume, ((0, 0), (ph, ph), (pw, pw)), mode="edge")
                y, x = int(rng.integers(2 * ph + 1)), int(rng.integers(2 * pw + 1))
                volume = padded[:, y:y + h, x:x + w]
        image = vdt_volume(np.moveaxis(volume, 0, -1), rng)
        return {"image": image, "label": np.int32(sample["label"])}


def vdt_dataset(source, *, size, batch: int, seed: int, augment: bool | Augment2D = True, shard_index: int = 0,
                shard_count: int = 1, num_epochs: int | None = None, threads: int = 2,
                prefetch: int = 4) -> grain.IterDataset:
    """Batches of VDT volumes for pre-training, in the style of :mod:`train.data.pipeline`.

    Element i depends only on (seed, i), so the iterator state is a position
    (use :func:`train.data.pipeline.make_iterator`).

    Args:
      source: a source from this module (or anything with the same items).
      size: in-plane (H, W) or one int; images of another size are resized.
      batch: images per batch (per process when sharded).
      seed: determines the order, the augmentations and the slice orders.
      augment: True for :class:`Augment2D` defaults (with flips only where
        the source's ``mirror_invariant`` allows), False for none, or settings.
      shard_index, shard_count, num_epochs, threads, prefetch: as for
        :func:`train.data.pipeline.patch_dataset`.

    Returns:
      An IterDataset of ``{'image': (B, 3, H, W, 1) float32, 'label': (B,) int32}``.
    """
    size = _size2(size)
    if size is None:
        raise ValueError("size is required: batches need one in-plane size")
    if augment is True:
        # A source says whether mirroring keeps the class (digits: no).
        augment = Augment2D(flip=getattr(source, "mirror_invariant", True))
    elif augment is False:
        augment = None
    elif not isinstance(augment, Augment2D):
        raise TypeError(f"augment must be a bool or an Augment2D, got {type(augment).__name__}")
    if len(source) < 1:
        raise ValueError(f"source {source!r} has no images")
    if not (isinstance(batch, (int, np.integer)) and batch >= 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not (isinstance(shard_count, int) and shard_count >= 1 and isinstance(shard_index, int)
            and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index!r}, {shard_count!r}")
    shuffle_seed, sample_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = EpochShuffle(grain.MapDataset.source(source), seed=shuffle_seed, num_epochs=num_epochs)
    ds = ds.random_map(VDTSample(size, augment), seed=sample_seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(int(batch), drop_remainder=True)
    return to_iter(ds, threads=threads, prefetch=prefetch)
