"""Run configuration: one frozen dataclass, named presets and the CLI flags over them.

``Config`` holds everything a run needs; ``PRESETS`` names complete configs
(``demo`` is the default, ``cpu-tiny`` is for tests, ``gpu`` for one large
accelerator). On the command line every flag defaults to "the preset's value",
so ``--preset=gpu --steps=100`` changes only the step count.

Errors in user input raise :class:`ConfigError`, which names the flag;
``train.main`` prints it as one line ``error: --flag: message``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any

INITS = ("scratch", "center", "average", "scale", "acs", "soft_acs", "2.5d")
# Datasets whose presets are tuned by hand; every other dataset is planned from its data (see apply_plan).
BUILTIN_DATASETS = ("mni152", "synthetic", "regions")
PLAN_MODES = ("auto", "off")
PRETRAINED = ("slices", "imagenet")
VDT_PREFIX = "vdt:"  # --pretrained=vdt:SOURCE: VDT pre-training on a 2D labelled image source
TASK_CHOICES = ("auto", "segmentation", "classification")  # train.tasks.CHOICES, without importing JAX
DIMS_CHOICES = ("auto", "2")  # --dims: the dims --init trains, or the 2D network itself
DTYPES = ("float32", "bfloat16", "float16")
# acsjax.ops.CONV_IMPLS, spelled out so that flags parse without importing JAX (a test keeps them equal).
CONV_IMPLS = ("auto", "xla", "gemm")
# The model dims each --init trains: inflating methods produce full 3D
# kernels; 'acs' keeps 2D kernels applied on three planes, 'soft_acs' too with a
# learnt per-channel mixing of the planes; '2.5d' uses (1, k, k).
INIT_DIMS = {"scratch": 3, "center": 3, "average": 3, "scale": 3, "acs": "acs", "soft_acs": "soft_acs", "2.5d": "2.5d"}


class ConfigError(ValueError):
    """Bad user input; ``flag`` names the command-line flag to blame."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag

    def line(self) -> str:
        """The one-line message the CLI prints."""
        return f"error: --{self.flag}: {self}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs. See ``FLAG_HELP`` for each field's meaning."""

    init: str = "scale"
    pretrained: str = ""
    dataset: str = "mni152"
    task: str = "auto"
    workdir: str = "runs/demo"
    cache_dir: str = ""
    model: str = "unet"
    model_options: dict = dataclasses.field(default_factory=dict)
    deep_supervision: bool = False
    remat: str = ""
    dtype: str = "float32"
    conv_impl: str = ""
    patch: tuple[int, int, int] = (32, 32, 32)
    batch: int = 2
    pad: bool = True
    foreground_fraction: float = 1 / 3
    class_weights: str = "none"
    augment: bool = True
    workers: int = 0
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    mesh: str = ""
    eval_every: int = 500
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 50
    slices_steps: int = 3000
    slices_batch: int = 32
    slices_lr: float = 3e-3
    eval_overlap: float = 0.5
    eval_mirror: bool = False
    eval_mirror_axes: str = "dhw"
    max_eval_cases: int = 0
    spacing: tuple[float, float, float] | None = None
    plan: str = "auto"
    dims: str = "auto"
    teacher: str = ""
    kd_weight: float = 0.5
    kd_temperature: float = 2.0
    labelled_fraction: float = 1.0
    # Names of the fields (and 'model_option:KEY' entries) the user set explicitly;
    # a plan never overrides them (see apply_plan).
    explicit: tuple[str, ...] = ()

    @property
    def model_dims(self):
        """Model dims trained by this run: 2 with ``--dims=2``, else from ``init`` (3, 'acs', 'soft_acs', '2.5d')."""
        if self.dims == "2":
            return 2
        return INIT_DIMS[self.init]

    @property
    def cache_path(self) -> str:
        """``cache_dir``, or the per-user default cache directory."""
        if self.cache_dir:
            return self.cache_dir
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(root, "acsjax")

    @property
    def planned(self) -> bool:
        """Whether this run's settings come from a plan of its dataset (see :func:`apply_plan`)."""
        if self.plan == "off":
            return False
        return self.plan != "auto" or self.dataset.partition(":")[0] not in BUILTIN_DATASETS

    @property
    def pretrained_source(self) -> str:
        """The 2D source used for inflation ('' for scratch; 'slices' unless set)."""
        if self.init == "scratch":
            return ""
        return self.pretrained or "slices"


# The 'demo' preset is the dataclass default plus three choices: a small U-Net
# on the 2 mm MNI152 renderings, sized to finish within ten minutes on two CPU
# cores. It relies on the 'auto' conv lowering, which picks acsjax's GEMM
# lowering for 3D convs on CPU (python -m train.bench step compares it with
# XLA's convolutions). Balanced class weights because its training slab (lower
# brain) holds 2.6 times more grey than white matter and its validation slab
# (upper brain) 1.2 times: unweighted, the network learns the training
# proportions as a prior and labels the validation slab's boundary white
# matter grey. Mirror test-time augmentation in the final validation only, and
# only left-right (w, the brain's own symmetry): on the demo's three seeds that
# pass keeps all but 0.001 of the Dice the 8 mirrors give, in 2 passes instead
# of 8 (README, "The demo").
# The 'default' preset is for a user's own dataset (msd:PATH, folder:PATH): the
# generic choices of a run (nnU-Net's: no class weights unless the plan asks,
# mirror test-time augmentation), while the patch, batch, spacing and the
# U-Net's stages come from the dataset's plan (train.planning), not from the
# demo. `--preset` defaults to 'demo' for the built-in datasets and 'default'
# for every other one.
PRESETS: dict[str, Config] = {
    "demo": Config(
        model_options={"widths": (8, 16, 32, 64)}, class_weights="balanced", eval_mirror=True, eval_mirror_axes="w"
    ),
    "default": Config(
        workdir="",
        model_options={"widths": (16, 32, 64, 128, 256)},
        patch=(64, 64, 64),
        eval_mirror=True,
        slices_steps=1000,
        eval_every=250,
    ),
    # The classification demo (--dataset=regions): a 3D ResNet-18 from scratch on
    # the 32^3 brain-sides cubes, sized for ten minutes on two CPU cores. XLA's
    # own convolutions: for this network they compile 5x faster here than the
    # GEMM lowering, which would eat the budget before the first step. No
    # class weights (the classes are balanced by construction).
    "classify": Config(
        dataset="regions",
        workdir="runs/regions",
        init="scratch",
        model="resnet18",
        conv_impl="xla",
        patch=(32, 32, 32),
        batch=8,
        steps=120,
        lr=1e-3,
        warmup_steps=10,
        eval_every=60,
        checkpoint_every=60,
        log_every=10,
        slices_steps=300,
        slices_batch=32,
    ),
    "cpu-tiny": Config(
        dataset="synthetic",
        workdir="runs/tiny",
        model_options={"widths": (4, 8)},
        patch=(16, 16, 16),
        batch=2,
        steps=6,
        lr=1e-2,
        slices_lr=1e-2,
        warmup_steps=1,
        eval_every=3,
        checkpoint_every=2,
        keep_checkpoints=2,
        log_every=1,
        slices_steps=3,
        slices_batch=4,
        max_eval_cases=1,
    ),
    "gpu": Config(
        workdir="runs/gpu",
        model_options={"widths": (32, 64, 128, 256, 320)},
        deep_supervision=True,
        dtype="bfloat16",
        remat="nothing_saveable",
        patch=(96, 96, 96),
        batch=2,
        workers=4,
        steps=5000,
        lr=1e-3,
        slices_lr=1e-3,
        warmup_steps=200,
        eval_every=500,
        checkpoint_every=250,
        keep_checkpoints=3,
        log_every=50,
        slices_steps=2000,
        slices_batch=32,
    ),
}

FLAG_HELP: dict[str, str] = {
    "init": "How the 3D model starts: scratch (random 3D), or inflated from a 2D source with center, "
    "average or scale (full 3D kernels), acs (ACS convolutions, 2D kernels on three planes), soft_acs "
    "(SoftACS: every 2D kernel on all three planes, mixed per channel by learnt weights that start equal) "
    "or 2.5d ((1, k, k) kernels).",
    "pretrained": "The source for an inflating --init: slices (train the 2D twin on 2D slices of "
    "the training volumes first; for classification the slices carry their case's class), imagenet (the "
    "shipped EfficientNet-Lite0 weights; --model=efficientnet_lite0 or efficientnet_lite0_unet), "
    "vdt:SOURCE (VDT: pre-train the run's own 3D model, or its encoder, as a classifier on a 2D labelled "
    "image source digits, lfw or folder:PATH read as depth-3 volumes, with depth strides off, for "
    "--slices_steps steps, then transfer it; WORKDIR/pretrained.json lists what was loaded) or a PATH to a "
    ".safetensors/.pth file, an Orbax 2D checkpoint directory or a python -m train.pretrain workdir. "
    "Default slices; must be empty with --init=scratch.",
    "dataset": "mni152 (the embedded demo), synthetic, regions (the embedded classification demo: which side "
    "of the brain a cube of an MNI152 rendering touches), msd:PATH (a Medical Segmentation Decathlon "
    "task folder; integer 'label's in its 'training' list make it a classification data set) or folder:PATH "
    "(images/ with labels/ NIfTI label maps, or with labels.csv (case,label) for classification).",
    "task": "auto (classification when the data set gives one class per case, else segmentation), "
    "segmentation or classification (checked against the data set). Without --dataset, "
    "--task=classification runs the classification demo (regions).",
    "workdir": "Run directory: checkpoints, metrics.csv, tensorboard/, config.json, summary.json. A rerun with the "
    "same workdir resumes from the latest good checkpoint.",
    "cache_dir": "Where sources cache decoded / rendered volumes and train.main keeps compiled programs "
    "(jax/; JAX_COMPILATION_CACHE_DIR overrides that place, empty turns it off) (default: "
    "$XDG_CACHE_HOME/acsjax, else ~/.cache/acsjax).",
    "model": "Model name for acsjax.models.build_model (unet, resnet18_unet, efficientnet_lite0_unet, ...).",
    "model_option": "Extra model option key=value (repeatable), values as Python literals, e.g. "
    "--model_option=widths=8,16,32 --model_option=norm='batch'.",
    "deep_supervision": "Add auxiliary heads at coarser resolutions to the loss (weights 1, 1/2, 1/4, ...).",
    "remat": "Rematerialisation policy for the model's blocks: a jax.checkpoint_policies name "
    "(e.g. nothing_saveable), or empty for none.",
    "dtype": "Compute dtype (float32, bfloat16, float16); parameters stay float32.",
    "conv_impl": "Convolution lowering (acsjax.ops.set_conv_impl): auto, xla (lax.conv) or gemm (gathered "
    "taps and matrix products; several times faster for narrow 3D networks on CPU). Empty: keep the "
    "process default (ACSJAX_CONV_IMPL, else auto).",
    "patch": "Training patch size D,H,W (one int for a cube); also the sliding-window size in evaluation.",
    "batch": "Global batch size (patches per step, over all devices and processes).",
    "pad": "Allow a patch larger than the training volumes (patches are padded); with --nopad the patch "
    "must fit inside at least one training volume.",
    "foreground_fraction": "Fraction of patches centred on a foreground voxel (nnU-Net uses 1/3).",
    "class_weights": "Cross-entropy weight per class: none, balanced (1 / (K x frequency) from the training "
    "labels, so the network does not learn the training set's class proportions as a prior) or K "
    "comma-separated numbers.",
    "augment": "Random flips, rotations and intensity augmentation of training patches.",
    "workers": "Data loader worker processes (0: load in the training process).",
    "steps": "Training steps of the 3D model.",
    "lr": "Peak learning rate of AdamW (linear warm-up, then cosine decay to 1% of it).",
    "warmup_steps": "Linear warm-up steps.",
    "weight_decay": "AdamW weight decay (kernels only; biases and norm scales are not decayed).",
    "grad_clip": "Clip gradients to this global norm (0: no clipping).",
    "seed": "Random seed of initialisation and data order.",
    "mesh": "Device mesh, e.g. data=4,space=2: 'data' shards the batch, 'space' the depth axis of "
    "each volume. Default: every device on 'data'.",
    "eval_every": "Validate (sliding-window Dice on the validation cases) every N steps; 0: only at the end.",
    "checkpoint_every": "Save a checkpoint every N steps (and always at the end).",
    "keep_checkpoints": "Keep the last N checkpoints, plus the best by validation score (Dice; for classification its score).",
    "log_every": "Print a progress line and a metrics.csv row every N steps.",
    "slices_steps": "Steps of 2D training on slices for --pretrained=slices (and of VDT pre-training for vdt:).",
    "slices_batch": "Batch size (2D slices, or VDT volumes) for --pretrained=slices or vdt:.",
    "slices_lr": "Peak learning rate of the 2D training on slices (the 3D training after it uses --lr: "
    "a lower rate keeps more of what the 2D network learned).",
    "eval_overlap": "Sliding-window overlap in evaluation, in [0, 1).",
    "eval_mirror": "Mirror test-time augmentation in the final validation: average the predictions of the "
    "volume flipped along every combination of --eval_mirror_axes (8 passes for all three axes in 3D).",
    "eval_mirror_axes": "The axes --eval_mirror flips, as letters of the data layout (d: depth, h: height, w: "
    "width; for the standard orientation S, A, R): 'dhw' all (2^3 passes), 'w' left-right only (2 passes). A 2D "
    "model (--dims=2) ignores d.",
    "max_eval_cases": "Evaluate on at most N validation cases (0: all).",
    "spacing": "Target voxel spacing in mm: one number or D,H,W (volumes are resampled to it). Default: the "
    "plan's target spacing for a planned dataset, the source's own for the built-in ones.",
    "plan": "auto (plan patch, batch, spacing, class weights and the U-Net's stages from the training data, "
    "written to WORKDIR/plan.json, for every dataset but the built-in mni152 and synthetic ones), off (take "
    "the preset as it is) or a PATH to a plan.json to use as it is. Explicit flags always win over the plan.",
    "dims": "auto (the dims --init trains) or 2: the run's model is the 2D network itself, trained on axial "
    "slices (--slices_batch slices of --patch's plane per step), validated and predicted on whole volumes "
    "slice by slice. Starts from scratch, or from a 2D --pretrained (imagenet or a PATH) loaded as it is.",
    "teacher": "A finished run's WORKDIR whose model teaches this one (knowledge distillation): its logits on "
    "each training case, computed on the teacher's own grid (its spacing, its dims) and resampled in world "
    "coordinates onto this run's grid, cached in WORKDIR/teacher/; voxels the teacher does not cover are left "
    "out of the distillation term. Same classes and input channels as this run's data. Empty: no teacher.",
    "kd_weight": "Weight a of the distillation term: loss = (1 - a) x supervised + a x T^2 x KL(teacher || "
    "student) at temperature T (--kd_temperature). Used with --teacher.",
    "kd_temperature": "Temperature T > 0 of the distillation term (softmax of logits / T). Used with --teacher.",
    "labelled_fraction": "Keep the labels of only this fraction of the training cases (at least one; chosen "
    "by --seed, every class kept for classification). Without --teacher the others are left out; with it "
    "they train on the distillation term alone.",
    "explicit": "(internal) the fields set explicitly; not a command-line flag.",
    "preset": "Named defaults: demo (the default for --dataset=mni152 and synthetic; CPU, minutes), classify (the "
    "default for --dataset=regions: a 3D ResNet-18 classifier; CPU, minutes), default "
    "(the default for msd:/folder: datasets: generic settings, the rest planned from the data), cpu-tiny "
    "(tests), gpu (one accelerator). A preset's patch x batch is the voxel budget the plan fills.",
}


def parse_patch(text: str) -> tuple[int, int, int]:
    """'32' -> (32, 32, 32); '32,64,64' -> (32, 64, 64)."""
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise ConfigError("patch", f"expected D,H,W or one int, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise ConfigError("patch", f"expected three positive ints D,H,W, got {text!r}")
    return values


def parse_spacing(text) -> tuple[float, float, float] | None:
    """'' or None -> None; '2' -> (2.0, 2.0, 2.0); '5,0.8,0.8' -> (5.0, 0.8, 0.8)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = text.replace("x", ",").split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise ConfigError("spacing", f"expected D,H,W in mm or one number, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):
        raise ConfigError("spacing", f"expected three positive spacings D,H,W in mm, got {text!r}")
    return values


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,space=2' -> {'data': 4, 'space': 2}; missing axes are left out."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if name not in ("data", "space") or not value:
            raise ConfigError("mesh", f"expected axes data=N,space=M, got {text!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ConfigError("mesh", f"axis {name} needs an integer size, got {value!r}") from None
        if out[name] < 1:
            raise ConfigError("mesh", f"axis {name} must be at least 1, got {out[name]}")
    return out


def parse_class_weights(text: str) -> str | tuple[float, ...] | None:
    """'none' -> None; 'balanced' -> 'balanced'; '1,2,0.5' -> (1.0, 2.0, 0.5)."""
    text = (text or "none").strip()
    if text in ("none", "balanced"):
        return None if text == "none" else text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("class_weights", f"expected none, balanced or comma-separated numbers, got {text!r}") from None
    if not all(v >= 0 and v < float("inf") for v in values) or not any(values):
        raise ConfigError("class_weights", f"weights must be finite, non-negative and not all zero, got {text!r}")
    return values


def parse_model_options(items) -> dict[str, Any]:
    """['widths=8,16', 'norm=batch'] -> {'widths': (8, 16), 'norm': 'batch'}."""
    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError("model_option", f"expected key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text  # a bare word such as norm=batch
    return out


def validate(config: Config) -> Config:
    """Checks what can be checked before touching data or devices; returns ``config``."""
    if config.init not in INITS:
        raise ConfigError("init", f"unknown {config.init!r}; choose one of {', '.join(INITS)}")
    if config.init == "scratch" and config.pretrained:
        raise ConfigError("pretrained", "a 2D source makes no sense with --init=scratch; pick an inflating --init")
    source = config.pretrained
    if source.startswith(VDT_PREFIX):
        if config.model_dims != 3:
            raise ConfigError("pretrained", f"{source}: VDT pre-trains full 3D kernels; use an --init that trains "
                              f"a 3D model (center, average or scale), not {config.init}")
    elif source and source not in PRETRAINED and not os.path.exists(source):
        raise ConfigError("pretrained", f"not slices, imagenet or vdt:SOURCE, and no such file or directory: {source}")
    if config.task not in TASK_CHOICES:
        raise ConfigError("task", f"unknown {config.task!r}; choose one of {', '.join(TASK_CHOICES)}")
    if config.dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    parse_mesh(config.mesh)
    if config.conv_impl and config.conv_impl not in CONV_IMPLS:
        raise ConfigError("conv_impl", f"unknown {config.conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}")
    positive = ("steps", "batch", "log_every", "checkpoint_every", "keep_checkpoints", "slices_batch")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(config, name)}")
    for name in ("eval_every", "warmup_steps", "workers", "slices_steps", "max_eval_cases"):
        if getattr(config, name) < 0:
            raise ConfigError(name, f"must be non-negative, got {getattr(config, name)}")
    for name in ("lr", "slices_lr"):
        if not getattr(config, name) > 0:
            raise ConfigError(name, f"must be positive, got {getattr(config, name)}")
    if not 0 <= config.foreground_fraction <= 1:
        raise ConfigError("foreground_fraction", f"must be in [0, 1], got {config.foreground_fraction}")
    parse_class_weights(config.class_weights)
    if not 0 <= config.eval_overlap < 1:
        raise ConfigError("eval_overlap", f"must be in [0, 1), got {config.eval_overlap}")
    axes = config.eval_mirror_axes
    if not axes or set(axes) - set("dhw") or len(set(axes)) != len(axes):
        raise ConfigError("eval_mirror_axes", f"expected distinct letters of d, h, w (e.g. dhw or w), got {axes!r}")
    if len(config.patch) != 3 or min(config.patch) < 1:
        raise ConfigError("patch", f"expected three positive ints, got {config.patch}")
    if not config.workdir:
        raise ConfigError("workdir", "must not be empty")
    if config.spacing is not None:
        parse_spacing(config.spacing)
    if config.plan not in PLAN_MODES and not os.path.isfile(config.plan):
        raise ConfigError("plan", f"not auto or off, and no such file: {config.plan}")
    _validate_dims_and_teacher(config)
    return config


def _validate_dims_and_teacher(config: Config) -> None:
    if config.dims not in DIMS_CHOICES:
        raise ConfigError("dims", f"unknown {config.dims!r}; choose one of {', '.join(DIMS_CHOICES)}")
    if config.dims == "2" and config.init != "scratch" and config.pretrained in ("", "slices"):
        raise ConfigError("dims", f"a 2D run trains the 2D network itself: use --init=scratch, or give a 2D "
                          f"--pretrained (imagenet or a PATH) to start from; --init={config.init} inflates into 3D")
    if config.dims == "2" and config.pretrained.startswith(VDT_PREFIX):
        raise ConfigError("dims", "VDT pre-trains a 3D network; a 2D run cannot start from it")
    if not 0 <= config.kd_weight <= 1:
        raise ConfigError("kd_weight", f"must be in [0, 1], got {config.kd_weight}")
    if not 0 < config.kd_temperature < float("inf"):
        raise ConfigError("kd_temperature", f"must be positive, got {config.kd_temperature}")
    if not 0 < config.labelled_fraction <= 1:
        raise ConfigError("labelled_fraction", f"must be in (0, 1], got {config.labelled_fraction}")
    if config.teacher and not os.path.isdir(config.teacher):
        raise ConfigError("teacher", f"no such run directory: {config.teacher}")


def default_workdir(dataset: str) -> str:
    """runs/NAME for a dataset spec: 'msd:/data/Task04_Hippocampus' -> 'runs/Task04_Hippocampus'."""
    kind, _, path = dataset.partition(":")
    name = os.path.basename(os.path.normpath(path)) if path else kind
    return os.path.join("runs", name or "run")


def default_preset(dataset: str) -> str:
    """'classify' for regions, 'demo' for the other built-in datasets, 'default' for a user's own (planned) dataset."""
    kind = dataset.partition(":")[0]
    if kind == "regions":
        return "classify"
    return "demo" if kind in BUILTIN_DATASETS else "default"


# What a plan (train.planning's ExperimentPlan.to_json()) sets, as Config field -> plan key.
PLANNED_FIELDS = {"patch": "patch", "batch": "batch", "spacing": "target_spacing", "class_weights": "class_weights"}
# U-Net options a plan sets (other models keep their own stages).
PLANNED_UNET_OPTIONS = ("widths", "strides", "kernels")


def apply_plan(config: Config, plan: dict) -> Config:
    """The config a planned run uses: ``plan``'s entries, except where the user set a flag.

    ``plan`` is a plan dict (``plan.json``). Fields named in ``config.explicit``
    keep their values; so do U-Net options given with --model_option. An
    explicit ``widths`` with fewer stages than the plan keeps the plan's first
    strides and kernels.
    """
    changes: dict[str, Any] = {}
    for field, key in PLANNED_FIELDS.items():
        if field in config.explicit or key not in plan:
            continue
        value = plan[key]
        changes[field] = tuple(value) if isinstance(value, list) else value
    if config.model == "unet":
        options = dict(config.model_options)
        given = {k for k in PLANNED_UNET_OPTIONS if f"model_option:{k}" in config.explicit}
        for key in PLANNED_UNET_OPTIONS:
            if key not in given and key in plan:
                options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in plan[key])
        stages = len(options.get("widths", ()))
        for key in ("strides", "kernels"):
            if key in options and key not in given and stages and len(options[key]) != stages:
                if len(options[key]) < stages:
                    raise ConfigError(
                        "model_option", f"widths has {stages} stages, the plan only {len(options[key])}; "
                        f"give --model_option={key}=... too or fewer widths"
                    )
                options[key] = options[key][:stages]
        changes["model_options"] = options
    return validate(dataclasses.replace(config, **changes))


def preset(name: str, **overrides) -> Config:
    """The named preset with ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown Config fields {sorted(unknown)}")
    if "patch" in overrides:
        patch = overrides["patch"]
        overrides["patch"] = parse_patch(",".join(map(str, patch)) if isinstance(patch, (list, tuple)) else patch)
    if "spacing" in overrides:
        overrides["spacing"] = parse_spacing(overrides["spacing"])
    explicit = set(overrides) - {"explicit"}
    explicit |= {f"model_option:{k}" for k in overrides.get("model_options", {})}
    overrides["explicit"] = tuple(sorted(explicit | set(overrides.get("explicit", ()))))
    config = dataclasses.replace(PRESETS[name], **overrides)
    if not config.workdir:
        config = dataclasses.replace(config, workdir=default_workdir(config.dataset))
    return validate(config)


def to_json(config: Config) -> dict:
    """A JSON-ready dict of the config (tuples become lists)."""
    return dataclasses.asdict(config)


def run_config(config: Config, source) -> dict:
    """WORKDIR/config.json: what train.predict needs to rebuild the model and its inputs."""
    prep = getattr(source, "preprocessing", None)
    return {
        "model": config.model,
        "dims": config.model_dims,
        "model_options": {k: list(v) if isinstance(v, tuple) else v for k, v in config.model_options.items()},
        "deep_supervision": config.deep_supervision,
        "remat": config.remat,
        "dtype": config.dtype,
        "in_channels": source.num_channels,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "patch": list(config.patch),
        "eval_overlap": config.eval_overlap,
        "eval_mirror_axes": config.eval_mirror_axes,
        "dataset": config.dataset,
        "preprocessing": dataclasses.asdict(prep) if dataclasses.is_dataclass(prep) else prep,
        "spacing": getattr(source, "spacing", None),
        "task": config.task if config.task != "auto" else getattr(source, "task", "segmentation"),
        "init": config.init,
        "pretrained": config.pretrained_source,
        "config": to_json(config),
    }


# The config.json fields that decide the shapes of the saved train state.
MODEL_FIELDS = ("model", "dims", "model_options", "deep_supervision", "in_channels", "num_classes")


def check_workdir_fits(path, new: dict) -> None:
    """ConfigError naming --workdir when ``path`` (a config.json next to saved checkpoints) is another model's.

    Resuming would fail on every checkpoint; refusing first keeps the old
    run's config.json and checkpoints as they are.
    """
    path = os.fspath(path)
    checkpoints = os.path.join(os.path.dirname(path), "checkpoints")
    if not (os.path.isfile(path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # unreadable: nothing to compare; restoring decides
    for key in MODEL_FIELDS:
        if isinstance(old, dict) and key in old and old[key] != new.get(key):
            raise ConfigError("workdir", f"{os.path.dirname(path) or '.'} holds checkpoints of another model "
                              f"({key} {old[key]!r} there, {new.get(key)!r} now); choose a new --workdir")


def write_run_config(path, config: Config, source) -> None:
    """Writes :func:`run_config` as JSON (numpy values become lists), after :func:`check_workdir_fits`."""
    text = json.dumps(run_config(config, source), indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    check_workdir_fits(path, json.loads(text))
    with open(path, "w") as f:
        f.write(text + "\n")



def define_flags(flag_values=None) -> None:
    """Defines one absl flag per ``Config`` field (plus --preset, --model_option).

    Flags default to None ("take the preset's value"); ``from_flags`` applies
    the ones given. Called by ``train.main`` only, so importing this module
    from a notebook or another CLI defines nothing.
    """
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    demo = PRESETS["demo"]
    flags.DEFINE_string("preset", None, FLAG_HELP["preset"], flag_values=fv)
    flags.DEFINE_multi_string("model_option", [], FLAG_HELP["model_option"], flag_values=fv)
    for field in dataclasses.fields(Config):
        name = field.name
        if name in ("model_options", "explicit"):
            continue
        value = getattr(demo, name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        help_text = f"{FLAG_HELP[name]} (demo: {shown!r})"
        if isinstance(value, bool):
            flags.DEFINE_bool(name, None, help_text, flag_values=fv)
        elif isinstance(value, int):
            flags.DEFINE_integer(name, None, help_text, flag_values=fv)
        elif isinstance(value, float):
            flags.DEFINE_float(name, None, help_text, flag_values=fv)
        else:
            flags.DEFINE_string(name, None, help_text, flag_values=fv)


def from_flags(flag_values=None) -> Config:
    """The Config that the parsed flags describe: the preset, then every flag given."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    # Without --dataset, the embedded demo of the task asked for (--task=classification: regions).
    demo = PRESETS["classify"] if fv["task"].value == "classification" else PRESETS["demo"]
    dataset = fv["dataset"].value or demo.dataset
    name = fv.preset or default_preset(dataset)
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        if field.name in ("model_options", "explicit"):
            continue
        value = fv[field.name].value
        if value is None:
            continue
        parse = {"patch": parse_patch, "spacing": parse_spacing}.get(field.name)
        overrides[field.name] = parse(value) if parse else value
    options = parse_model_options(fv.model_option)
    explicit = set(overrides) | {f"model_option:{k}" for k in options}
    if options:
        overrides["model_options"] = {**base.model_options, **options}
    config = dataclasses.replace(base, **overrides, explicit=tuple(sorted(explicit)))
    if not config.workdir:
        config = dataclasses.replace(config, workdir=default_workdir(config.dataset))
    return validate(config)
