"""torchvision/timm ImageNet ResNet34 state dicts into the torchvision unit, without torch.

The files are synthetic (random values with torchvision's resnet34 key names and shapes):
``.safetensors`` written with ``safetensors.numpy``, ``.pth`` written here in torch's zip
format (``archive/data.pkl`` + ``archive/data/<key>``) through a stand-in ``torch`` module.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import sys
import types
import zipfile

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

from cellnet.errors import CellnetError
from cellnet.models import CellSegmenter, ResNet34Backbone, SRCascade, load_backbone_weights
from cellnet.models.pretrained import read_state_dict

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
#: torchvision's resnet34 has 21,797,672 parameters, 513,000 of them in fc (512 x 1000 + 1000).
TORCHVISION_PARAMS_WITHOUT_FC = 21_797_672 - 513_000
BN_PARTS = ("weight", "bias", "running_mean", "running_var")


# ----------------------------------------------------------------------------- synthetic files

def _resnet34_shapes() -> dict[str, tuple]:
    """torchvision resnet34's state-dict keys and shapes, in its order (num_batches_tracked aside)."""
    shapes: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"bn1.{part}": (64,) for part in BN_PARTS})
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 3, 3)
            shapes.update({f"{prefix}.bn1.{part}": (planes,) for part in BN_PARTS})
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update({f"{prefix}.bn2.{part}": (planes,) for part in BN_PARTS})
            if block == 0 and layer > 1:
                shapes[f"{prefix}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                shapes.update({f"{prefix}.downsample.1.{part}": (planes,) for part in BN_PARTS})
            inplanes = planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
    return shapes


def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values of sensible scale (He-scaled kernels, positive variances)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for key, shape in _resnet34_shapes().items():
        if key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight")):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 4:
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        state[key] = value.astype("float32")
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.array(7, "int64")
    return state


def _write_safetensors(state: dict[str, np.ndarray], path) -> str:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return str(path)


class _Storage:
    def __init__(self, key: str, storage_type: type, values: np.ndarray):
        self.key, self.storage_type, self.values = key, storage_type, values


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.values.size)
        return None


@contextlib.contextmanager
def _fake_torch():
    """A stand-in ``torch`` so pickle writes the globals torch.save writes; removed afterwards."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # referenced by name only, never called here
        raise AssertionError(args)

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", torch)
        patch.setitem(sys.modules, "torch._utils", utils)
        yield torch


def _write_pth(state: dict[str, np.ndarray], path) -> str:
    """torch's zip checkpoint format. The four tensors of a BN share one storage (offsets 0, C,
    2C, 3C) and ``conv1.weight`` is a strided view of an HWIO storage, to exercise the views."""
    storages: dict[str, _Storage] = {}

    def tensor(storage: _Storage, offset: int, size: tuple, stride: tuple):
        reduce = (sys.modules["torch._utils"]._rebuild_tensor_v2,
                  (storage, offset, size, stride, False, collections.OrderedDict()))
        return type("Tensor", (), {"__reduce__": lambda self: reduce})()

    def new_storage(values: np.ndarray, storage_type: type) -> _Storage:
        storage = _Storage(str(len(storages)), storage_type, np.ascontiguousarray(values).ravel())
        storages[storage.key] = storage
        return storage

    with _fake_torch() as torch:
        pickled = collections.OrderedDict()
        for key, value in state.items():
            prefix, part = key.rsplit(".", 1)
            if value.dtype == np.int64:
                pickled[key] = tensor(new_storage(value, torch.LongStorage), 0, (), ())
            elif f"{prefix}.running_var" in state:  # a BN's four tensors
                if part == "weight":
                    shared = new_storage(np.concatenate([state[f"{prefix}.{p}"] for p in BN_PARTS]),
                                         torch.FloatStorage)
                pickled[key] = tensor(shared, BN_PARTS.index(part) * value.size, value.shape, (1,))
            elif key == "conv1.weight":
                o, i, h, w = value.shape
                storage = new_storage(value.transpose(2, 3, 1, 0), torch.FloatStorage)
                pickled[key] = tensor(storage, 0, value.shape, (1, o, w * i * o, i * o))
            else:
                strides = tuple(s // value.itemsize for s in np.ascontiguousarray(value).strides)
                pickled[key] = tensor(new_storage(value, torch.FloatStorage), 0, value.shape, strides)
        pickled._metadata = collections.OrderedDict({"": {"version": 1}})
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(pickled)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in storages.values():
            little_endian = storage.values.astype(storage.values.dtype.newbyteorder("<"))
            archive.writestr(f"archive/data/{storage.key}", little_endian.tobytes())
        archive.writestr("archive/version", "3\n")
    return str(path)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return _state_dict()


@pytest.fixture(scope="module")
def backbone() -> ResNet34Backbone:
    """The one width-1.0 backbone (ImageNet shapes), with the ImageNet input normalisation."""
    return ResNet34Backbone(unit="torchvision", width=1.0, input_norm="imagenet")


def _mapping(backbone: ResNet34Backbone) -> dict[str, str]:
    """Keras layer -> torch prefix, spelled out from the two naming schemes."""
    mapping = {"stem_conv": "conv1", "stem_bn": "bn1"}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for unit in range(1, blocks + 1):
            keras_name, torch_name = f"stage{stage}_unit{unit}", f"layer{stage - 1}.{unit - 1}"
            for k in (1, 2):
                mapping[f"{keras_name}_conv{k}"] = f"{torch_name}.conv{k}"
                mapping[f"{keras_name}_bn{k}"] = f"{torch_name}.bn{k}"
            if unit == 1 and stage > 2:
                mapping[f"{keras_name}_downsample_conv"] = f"{torch_name}.downsample.0"
                mapping[f"{keras_name}_downsample_bn"] = f"{torch_name}.downsample.1"
    assert sorted(mapping) == sorted(layer.name for layer in backbone.layers if layer.weights)
    return mapping


def _assert_loaded(backbone: ResNet34Backbone, state: dict[str, np.ndarray]) -> None:
    used = set()
    for keras_name, prefix in _mapping(backbone).items():
        layer = backbone.get_layer(keras_name)
        if isinstance(layer, keras.layers.Conv2D):
            pairs = [(layer.kernel, state[f"{prefix}.weight"].transpose(2, 3, 1, 0))]
            used.add(f"{prefix}.weight")
        else:
            variables = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
            pairs = [(v, state[f"{prefix}.{part}"]) for v, part in zip(variables, BN_PARTS)]
            used.update(f"{prefix}.{part}" for part in BN_PARTS)
        for variable, expected in pairs:
            np.testing.assert_array_equal(variable.numpy(), expected, err_msg=f"{keras_name} <- {prefix}")
    ignored = {k for k in state if k.startswith("fc.") or k.endswith("num_batches_tracked")}
    assert used == set(state) - ignored


# ----------------------------------------------------------------------------- loading

def test_safetensors_state_dict_lands_in_every_layer_transposed(backbone, state, tmp_path):
    load_backbone_weights(backbone, _write_safetensors(state, tmp_path / "model.safetensors"))
    _assert_loaded(backbone, state)


def test_pth_zip_checkpoint_is_read_without_torch(backbone, state, tmp_path):
    path = _write_pth(state, tmp_path / "resnet34-synthetic.pth")
    read = read_state_dict(path)
    assert list(read) == list(state)
    for key, value in state.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
        np.testing.assert_array_equal(read[key], value, err_msg=key)
    other = _state_dict(seed=1)  # different values from the safetensors test's
    load_backbone_weights(backbone, _write_pth(other, tmp_path / "other.pth"))
    _assert_loaded(backbone, other)


def test_pth_written_by_torch_reads_the_same(state, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "torch.pth"
    torch.save(collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in state.items()), path)
    read = read_state_dict(path)
    assert list(read) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(read[key], value, err_msg=key)


def test_sr_cascade_imagenet_regressor_loads_3_channel_weights(state, tmp_path):
    segmenter = CellSegmenter(ResNet34Backbone(width=0.125))
    cascade = SRCascade(segmenter, width=1.0, unit="torchvision", drop_background=True)
    assert cascade.regressor.input_channels == 3
    load_backbone_weights(cascade.regressor, _write_safetensors(state, tmp_path / "model.safetensors"))
    _assert_loaded(cascade.regressor, state)
    assert cascade(np.zeros((1, 64, 64, 3), "float32")).shape == (1, 1)


def test_parameter_count_is_torchvision_resnet34_without_fc(backbone, state):
    """Trainable: 21,284,672 (torchvision's 21,797,672 less fc). Keras's count_params also
    counts the BN moving mean/variance (torch buffers, not parameters): 2 x 8,512 channels more,
    21,301,696, which is every tensor of the state dict except fc and num_batches_tracked."""
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert trainable == TORCHVISION_PARAMS_WITHOUT_FC == 21_284_672
    mapped = sum(v.size for k, v in state.items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    assert backbone.count_params() == mapped == 21_301_696


# ----------------------------------------------------------------------------- numerics

def _conv(x: np.ndarray, w_oihw: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """PyTorch Conv2d (no bias): symmetric zero padding, NHWC in and out."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    o, _, kh, kw = w_oihw.shape
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, o))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
            out += patch @ w_oihw[:, :, dy, dx].T
    return out


def _bn(x: np.ndarray, state: dict, prefix: str) -> np.ndarray:
    s = {part: state[f"{prefix}.{part}"].astype("float64") for part in BN_PARTS}
    return (x - s["running_mean"]) / np.sqrt(s["running_var"] + 1e-5) * s["weight"] + s["bias"]


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _maxpool(x: np.ndarray) -> np.ndarray:
    """PyTorch MaxPool2d(3, stride 2, padding 1): the border never wins."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [x[:, dy:dy + 2 * (ho - 1) + 1:2, dx:dx + 2 * (wo - 1) + 1:2]
               for dy in range(3) for dx in range(3)]
    return np.max(windows, axis=0)


def test_stem_and_downsampling_block_match_a_pytorch_arithmetic_reference(backbone, state, tmp_path):
    load_backbone_weights(backbone, _write_safetensors(state, tmp_path / "model.safetensors"))
    w = {k: v.astype("float64") for k, v in state.items()}
    probe = keras.Model(backbone.input, [backbone.get_layer(n).output
                                         for n in ("stem_pool", "stage2_unit3_out", "stage3_unit1_out")])
    # 32 x 35: even sizes are where Keras "same" at stride 2 pads differently from PyTorch.
    image = np.random.default_rng(3).uniform(-1, 1, (1, 32, 35, 3)).astype("float32")
    stem_out, block_in, block_out = (t.numpy().astype("float64") for t in probe(image))

    x = ((image.astype("float64") + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    expected_stem = _maxpool(_elu(_bn(_conv(x, w["conv1.weight"], 2, 3), state, "bn1")))
    assert expected_stem.shape == stem_out.shape == (1, 8, 9, 64)
    np.testing.assert_allclose(stem_out, expected_stem, rtol=1e-4, atol=1e-4)

    y = _elu(_bn(_conv(block_in, w["layer2.0.conv1.weight"], 2, 1), state, "layer2.0.bn1"))
    y = _bn(_conv(y, w["layer2.0.conv2.weight"], 1, 1), state, "layer2.0.bn2")
    shortcut = _bn(_conv(block_in, w["layer2.0.downsample.0.weight"], 2, 0), state, "layer2.0.downsample.1")
    expected_block = _elu(y + shortcut)
    assert expected_block.shape == block_out.shape == (1, 4, 5, 128)
    np.testing.assert_allclose(block_out, expected_block, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors

def _one_line_error(backbone, path, match: str) -> str:
    before = backbone.get_layer("stem_conv").kernel.numpy().copy()
    with pytest.raises(CellnetError, match=match) as error:
        load_backbone_weights(backbone, path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(os.fspath(path))
    # nothing is assigned before every tensor is checked
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").kernel.numpy(), before)
    return message


def test_missing_key_is_named(backbone, state, tmp_path):
    partial = {k: v for k, v in state.items() if k != "layer2.0.downsample.0.weight"}
    _one_line_error(backbone, _write_safetensors(partial, tmp_path / "partial.safetensors"),
                    r"partial\.safetensors: key layer2\.0\.downsample\.0\.weight missing "
                    r"\(expected a torchvision/timm resnet34 state dict\)")


def test_mis_shaped_key_is_named(backbone, state, tmp_path):
    reshaped = {**state, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), "float32")}
    _one_line_error(backbone, _write_pth(reshaped, tmp_path / "reshaped.pth"),
                    r"reshaped\.pth: layer1\.0\.conv1\.weight has shape \(64, 64, 1, 1\) "
                    r"but the backbone expects \(64, 64, 3, 3\)")


def test_narrow_or_4_channel_backbones_and_other_units_are_refused(state, tmp_path):
    path = _write_safetensors(state, tmp_path / "model.safetensors")
    narrow = ResNet34Backbone(unit="torchvision", width=0.125)
    _one_line_error(narrow, path, r"conv1\.weight has shape \(64, 3, 7, 7\) but the backbone "
                                  r"expects \(16, 3, 7, 7\).*width 0\.125")
    four = ResNet34Backbone(unit="torchvision", width=0.125, input_channels=4)
    _one_line_error(four, path, r"conv1\.weight has shape \(64, 3, 7, 7\) .* \(16, 4, 7, 7\)")
    preact = ResNet34Backbone(unit="preact", width=0.125)
    _one_line_error(preact, path, r"model\.safetensors: .*not 'preact'.*--init imagenet:PATH "
                                  r"with a \.pth/\.safetensors file needs --unit torchvision")


def test_unreadable_files_are_named(backbone, tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"conv1.weight": 0}))
    _one_line_error(backbone, legacy, r"legacy\.pth: not a torch zip checkpoint")

    no_pickle = tmp_path / "empty.pt"
    with zipfile.ZipFile(no_pickle, "w") as archive:
        archive.writestr("archive/version", "3\n")
    _one_line_error(backbone, no_pickle, r"empty\.pt: cannot be read as a torch state dict")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _one_line_error(backbone, garbage, r"garbage\.safetensors: cannot be read as a safetensors file")


def test_pickled_code_is_refused_not_run(backbone, tmp_path):
    """A pickle that would call os.system on loading names the global it was refused."""
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + os.fspath(tmp_path / "ran"),)

    path = tmp_path / "payload.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": Payload()}, protocol=2))
    _one_line_error(backbone, path, rf"payload\.pth: .*refuses to load {os.system.__module__}\.system")
    assert not (tmp_path / "ran").exists()
