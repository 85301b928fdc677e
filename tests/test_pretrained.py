"""Tests for acsjax.pretrained: real ImageNet weights on real photographs, ResNet import
against PyTorch, encoder loading, our own trees, and errors for what does not fit."""

import pickle
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
from flax import nnx

import acsjax
from acsjax import pretrained
from acsjax.models import ResNet, build_model, param_count
from acsjax.statedict import UnsafeCheckpointError, load_state_dict, save_safetensors
from acsjax.trees import flatten, leaf_name

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968, 504)  # espresso, cup, coffee mug


def photo(image, size):
    """Shorter side resized to ``size``, centre crop, values in [0, 1], ImageNet-normalised."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    image = skimage.transform.resize(image, (round(h * s), round(w * s)), anti_aliasing=True)
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.asarray(pretrained.imagenet_normalize(image[top : top + size, left : left + size]))


def photos(size):
    return np.stack([photo(skimage.data.chelsea(), size), photo(skimage.data.coffee(), size)])


# One jitted function for every test: a network of the same structure on inputs of the same shape is traced
# and compiled once per module, not once per call.
_FORWARD = nnx.jit(lambda m, x: m(x))


def forward(model, x):
    return np.asarray(_FORWARD(model, jnp.asarray(x)))


def numpy_fill(abstract, seed=0):
    """Fills the still-abstract variables of an ``nnx.eval_shape`` model with numpy values (no compilation)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        shape = leaf.shape
        if leaf_name(path) == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        return (float(leaf_name(path) in ("scale", "var")) + 0.1 * rng.normal(size=shape)).astype(np.float32)

    nnx.update(abstract, jax.tree_util.tree_map_with_path(fill, nnx.state(abstract)))
    return abstract


def abstract(name, dims, **kw):
    return nnx.eval_shape(lambda: build_model(name, dims=dims, rngs=nnx.Rngs(0), **kw))


@pytest.fixture(scope="module")
def lite0_2d():
    return pretrained.efficientnet_lite0()


def test_efficientnet_lite0_classifies_photographs(lite0_2d):
    top = np.argsort(-forward(lite0_2d, photos(224)), axis=1)
    assert top[0, 0] in CAT_CLASSES, top[0, :5]
    assert top[1, 0] in COFFEE_CLASSES, top[1, :5]


def test_checkpoint_has_the_model_parameter_count(lite0_2d):
    state_dict = load_state_dict(pretrained.efficientnet_lite0_weights_path())
    trainable = sum(v.size for k, v in state_dict.items() if "running" not in k and "num_batches" not in k)
    assert trainable == param_count(lite0_2d) == 4_652_008


def test_inflated_3d_reproduces_2d_on_a_boring_volume(lite0_2d):
    """'average' inflation with the default (edge) depth padding: a volume repeating the image gives the 2D logits."""
    images = photos(64)
    volume = np.repeat(images[:, None], 8, axis=1)
    model3d = pretrained.efficientnet_lite0(dims=3, init="average")
    assert model3d.conv_stem.depth_padding == "edge"
    logits2d, logits3d = forward(lite0_2d, images), forward(model3d, volume)
    np.testing.assert_array_equal(np.argsort(-logits3d, 1)[:, :5], np.argsort(-logits2d, 1)[:, :5])
    chex.assert_trees_all_close(logits3d, logits2d, atol=1e-3, rtol=1e-4)
    assert np.argmax(logits3d[0]) in CAT_CLASSES
    # Depthwise kernels inflate too: (3, 3, 1, 96) -> (3, 3, 3, 1, 96), each tap a third of the 2D kernel.
    k2 = np.asarray(lite0_2d.blocks[1].depthwise_conv.kernel[...])
    k3 = np.asarray(model3d.blocks[1].depthwise_conv.kernel[...])
    assert k3.shape == (3, 3, 3, 1, 96)
    np.testing.assert_allclose(k3, np.broadcast_to(k2 / 3, k3.shape), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["average", "scale"])
def test_inflated_top1_on_a_repeated_photograph_at_any_depth(lite0_2d, init):
    """The constructor's promise with its defaults: the 2D top-1 (and logits) at depths 1, 3 and 16.

    Depth 1 and 3 go through five stride-2 depth steps ('SAME' padding keeps one
    slice); with zero depth padding the same model answers 649 ('average') or 506
    ('scale') at 64 px on every one of these depths instead of 285.
    """
    image = photos(64)[:1]
    logits2d = forward(lite0_2d, image)
    assert np.argmax(logits2d) == 285  # tabby at 64 px too
    model = pretrained.efficientnet_lite0(dims=3, init=init)
    for depth in (1, 3, 16):
        logits = forward(model, np.repeat(image[:, None], depth, axis=1))
        assert np.argmax(logits) == 285, (init, depth)
        chex.assert_trees_all_close(logits, logits2d, atol=1e-3, rtol=1e-4)


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_center_and_acs_on_a_repeated_photograph(lite0_2d):
    """What holds exactly on an image repeated along depth (default edge depth padding, depth striding on).

    - 'center': each 3D kernel's only non-zero tap reads the slice itself, and every
      layer's output stays constant along depth, so the logits are the 2D logits.
    - 'acs': the axial third of each layer is the 2D kernel, the coronal and sagittal
      thirds see the image along one in-plane axis only; on a depth-constant input
      the whole network is the 2D network whose kernels are the ACS kernels made
      3D and summed over depth, ``project_params(acs_to_3d(...))``; its logits match
      that network's, not the ImageNet network's.
    """
    # The same shapes as test_inflated_3d_reproduces_2d_on_a_boring_volume (two photographs, depth 8), so the 2D
    # and 3D forward programs compiled there serve here too: only the ACS network compiles anew.
    image = photos(64)
    volume = np.repeat(image[:, None], 8, axis=1)
    logits2d = forward(lite0_2d, image)
    center = pretrained.efficientnet_lite0(dims=3, init="center")
    assert center.bn0.use_running_average is True  # returned in eval mode
    chex.assert_trees_all_close(forward(center, volume), logits2d, atol=1e-3, rtol=1e-4)

    acs = pretrained.efficientnet_lite0(dims="acs")
    projected = pretrained.efficientnet_lite0()
    nnx.update(projected, acsjax.project_params(acsjax.acs_to_3d(nnx.state(acs))))
    want = forward(projected, image)
    assert np.abs(want - logits2d).max() > 1.0  # a different network from the 2D one ...
    chex.assert_trees_all_close(forward(acs, volume), want, atol=1e-3, rtol=1e-4)  # ... which ACS computes exactly


def test_efficientnet_unet_encoder_from_imagenet():
    """One input channel: the stem kernel is the sum over RGB; the rest equals the checkpoint; inflation fits."""
    model = numpy_fill(abstract("efficientnet_lite0_unet", 2, in_channels=1, num_classes=3))
    decoder_before = np.asarray(model.decoder.blocks[0].conv1.conv.kernel[...])
    pretrained.load_encoder(model, "imagenet")
    sd = load_state_dict(pretrained.efficientnet_lite0_weights_path())
    stem = np.transpose(sd["_conv_stem.weight"], (2, 3, 1, 0))
    np.testing.assert_allclose(model.encoder.conv_stem.kernel[...], stem.sum(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(
        model.encoder.blocks[15].bn2.var[...], sd["_blocks.15._bn2.running_var"]
    )
    np.testing.assert_array_equal(model.decoder.blocks[0].conv1.conv.kernel[...], decoder_before)
    inflated = jax.eval_shape(lambda s: acsjax.inflate_params(s, "average"), nnx.state(model))
    acsjax.assert_fits(inflated, nnx.state(abstract("efficientnet_lite0_unet", 3, in_channels=1, num_classes=3)))


# ----------------------------------------------------------------- ResNet vs PyTorch --


def torch_resnet18(num_classes=10):
    """torchvision's ResNet-18, written out (torchvision itself is not installed)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, width in enumerate((64, 128, 256, 512)):
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(Block(cin, width, stride), Block(width, width, 1)))
                cin = width
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    net = torch_resnet18()
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
    assert len(state_dict) == 122  # torchvision resnet18's key count
    d = tmp_path_factory.mktemp("resnet18")
    torch.save(net.state_dict(), d / "resnet18.pth")
    save_safetensors(d / "resnet18.safetensors", state_dict)
    return dict(pth=d / "resnet18.pth", safetensors=d / "resnet18.safetensors", x=x, logits=logits, sd=state_dict)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_resnet18_import_reproduces_pytorch(resnet18_files, fmt):
    model = nnx.eval_shape(lambda: ResNet(18, num_classes=10, rngs=nnx.Rngs(0)))
    pretrained.load_resnet(model, resnet18_files[fmt])
    model.eval()
    ours = forward(model, np.transpose(resnet18_files["x"], (0, 2, 3, 1)))
    chex.assert_trees_all_close(ours, resnet18_files["logits"], atol=2e-4, rtol=1e-4)
    # Every tensor landed at its path, transposed (the round trip of names and layouts).
    flat = flatten(nnx.state(model))
    for path, (name, value) in pretrained.torch_to_flax(resnet18_files["sd"]).items():
        np.testing.assert_array_equal(flat[path], value, err_msg=name)
    assert flat["layer2/0/downsample/0/kernel"].shape == (1, 1, 64, 128)


def test_resnet_unet_encoder_from_file(resnet18_files):
    model = numpy_fill(abstract("resnet18_unet", 2, in_channels=2, num_classes=3))
    pretrained.load_encoder(model, resnet18_files["safetensors"], adapt="mean")
    rgb = np.transpose(resnet18_files["sd"]["conv1.weight"], (2, 3, 1, 0))
    np.testing.assert_allclose(
        model.encoder.conv1.kernel[...], np.repeat(rgb.mean(axis=2, keepdims=True), 2, axis=2), rtol=1e-6
    )
    np.testing.assert_array_equal(
        model.encoder.layer4[1].bn2.mean[...], resnet18_files["sd"]["layer4.1.bn2.running_mean"]
    )


# ------------------------------------------------------------------------ own trees --


def test_load_tree_roundtrip_and_mismatch():
    source = numpy_fill(abstract("unet", 2, in_channels=1, num_classes=2, widths=(4, 8)), seed=1)
    for tree in (nnx.state(source).to_pure_dict(), nnx.state(source, nnx.Param), nnx.state(source)):
        target = numpy_fill(abstract("unet", 2, in_channels=1, num_classes=2, widths=(4, 8)), seed=2)
        pretrained.load_tree(target, tree)
        chex.assert_trees_all_equal(
            nnx.state(target, nnx.Param).to_pure_dict(), nnx.state(source, nnx.Param).to_pure_dict()
        )
    other = numpy_fill(abstract("unet", 2, in_channels=1, num_classes=2, widths=(4, 16)))
    with pytest.raises(ValueError, match="checkpoint does not fit the target model at 'decoder/blocks/0/conv1") as info:
        pretrained.load_tree(other, nnx.state(source).to_pure_dict())
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------- errors --


def one_line_errors(cases):
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern) as info:
            fn()
        assert "\n" not in str(info.value), str(info.value)


def resnet_abstract(num_layers=18, **kw):
    return nnx.eval_shape(lambda: ResNet(num_layers, rngs=nnx.Rngs(0), **kw))


def test_errors_name_what_does_not_fit(tmp_path):
    lite0_path = pretrained.efficientnet_lite0_weights_path()

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    one_line_errors([
        (ValueError, r"does not fit ResNet\(dims=2\): missing .*unexpected .*_conv_stem\.weight",
         lambda: pretrained.load_resnet(resnet_abstract(), lite0_path)),
        (UnsafeCheckpointError, r"refusing pickle global (posix|os)\.system",
         lambda: pretrained.load_resnet(resnet_abstract(), evil)),
        (ValueError, r"2D weights load into the dims=2 .*inflate_params",
         lambda: pretrained.load_resnet(resnet_abstract(dims=3), lite0_path)),
        (ValueError, r"resnet18_unet: no installed package ships ResNet ImageNet weights",
         lambda: pretrained.load_encoder(abstract("resnet18_unet", 2, in_channels=1, num_classes=2), "imagenet")),
        (TypeError, r"load_encoder: model must be a ResNetUNet or EfficientNetUNet .*got UNet",
         lambda: pretrained.load_encoder(abstract("unet", 2, in_channels=1, num_classes=2), "imagenet")),
        (TypeError, r"load_resnet: model must be a ResNet or ResNetUNet, got EfficientNetLite",
         lambda: pretrained.load_resnet(abstract("efficientnet_lite0", 2, in_channels=3, num_classes=2), lite0_path)),
        (ValueError, r"init='acs' needs dims='acs'", lambda: pretrained.efficientnet_lite0(dims=3, init="acs")),
        (ValueError, r"dims must be one of", lambda: pretrained.efficientnet_lite0(dims=4)),
    ])
    assert not (tmp_path / "pwned").exists()


def test_errors_for_torch_written_files(tmp_path, resnet18_files):
    torch = pytest.importorskip("torch")
    not_a_dict = tmp_path / "not_a_dict.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, not_a_dict)
    one_line_errors([
        (ValueError, r"does not fit ResNet\(dims=2\): missing \d+ \(layer1/2/",
         lambda: pretrained.load_resnet(resnet_abstract(34), resnet18_files["pth"], load_head=False)),
        (ValueError, r"wrong shape 2 \(fc\.weight \(10, 512\) -> fc/kernel \(512, 1000\)",
         lambda: pretrained.load_resnet(resnet_abstract(), resnet18_files["sd"], load_head=True)),
        (ValueError, r"ResNet\(dims=2\) is abstract and the source leaves 2 variables without values \(fc/bias, fc/kernel\)",
         lambda: pretrained.load_resnet(resnet_abstract(), resnet18_files["sd"])),
        (ValueError, r"not_a_dict\.pth: not a plain tensor dict",
         lambda: pretrained.load_resnet(resnet_abstract(), not_a_dict)),
    ])
