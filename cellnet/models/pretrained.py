"""ImageNet ResNet34 weights from torchvision (``.pth``) or timm (``.safetensors``), without torch.

Both hold the same state dict (``conv1``, ``bn1``, ``layer1..4.<block>.conv1/bn1/conv2/bn2``,
``layer2..4.0.downsample.0/1``, ``fc``), which fits a ``ResNet34Backbone(unit="torchvision",
width=1.0, input_channels=3)`` tensor for tensor. Files are read from local paths only.

A torchvision ``.pth`` is a zip (``torch.save`` since torch 1.6): ``<archive>/data.pkl`` pickles
the dict, whose tensors point at raw little-endian storages ``<archive>/data/<key>``. The pickle
is read by an unpickler that knows only the few globals a state dict uses and refuses every
other, so a file can name no code to run.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from cellnet.errors import bad
from cellnet.models.backbone import ResNet34Backbone

EXPECTED = "expected a torchvision/timm resnet34 state dict"
WRONG_UNIT = "--init imagenet:PATH with a .pth/.safetensors file needs --unit torchvision"

#: torch storage classes -> NumPy dtypes (NumPy has no bfloat16, so BFloat16Storage is refused).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


# ----------------------------------------------------------------------------- reading files

@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.<Name>Storage`` in the pickle."""

    name: str


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a view (offset, size, stride in elements) of a storage."""
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise ValueError(f"bad tensor layout (offset {offset}, size {size}, stride {stride})")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ValueError(f"tensor of size {size} runs past its storage of {storage.size} elements")
    base = storage[offset:] if 0 not in size else storage[:0]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a Parameter is its data here."""
    return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; every global outside ``_GLOBALS`` is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refuses to load {module}.{name} (only tensors and dicts are read; "
                "save model.state_dict(), not the model)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type.name, key, numel)
        return self.storages[key]

    def _read_storage(self, storage_name: str, key: str, numel: int) -> np.ndarray:
        order = "<" if self.byteorder == "little" else ">"
        dtype = np.dtype(order + STORAGE_DTYPES[storage_name])
        raw = self.archive.read(f"{self.prefix}data/{key}")
        if len(raw) < numel * dtype.itemsize:
            raise ValueError(f"storage {key} holds {len(raw)} bytes, not {numel} x {dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype, count=numel)


def _read_torch_zip(path: str) -> dict:
    if not zipfile.is_zipfile(path):
        raise bad(path, "not a torch zip checkpoint (torch.save since torch 1.6 writes one; "
                        f"re-save it with a recent torch or use timm's model.safetensors); {EXPECTED}")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(pickles) != 1:
                raise ValueError("no <archive>/data.pkl record")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
            with archive.open(pickles[0]) as file:
                return _StateDictUnpickler(file, archive, prefix, byteorder).load()
    except (pickle.UnpicklingError, ValueError, KeyError, EOFError, TypeError, IndexError,
            AttributeError, zipfile.BadZipFile, zlib.error, OSError) as error:
        raise bad(path, f"cannot be read as a torch state dict ({error}); {EXPECTED}") from None


def _read_safetensors(path: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own and builtin errors on a bad file
        raise bad(path, f"cannot be read as a safetensors file ({error}); {EXPECTED}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a torch ``.pth``/``.pt`` zip checkpoint or a ``.safetensors`` file, by key."""
    path = os.fspath(path)
    state = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_zip(path)
    if not isinstance(state, dict):
        raise bad(path, f"holds a {type(state).__name__}, not a dict of tensors; {EXPECTED}")
    return state


# ----------------------------------------------------------------------------- key mapping

def torch_key(layer_name: str) -> str:
    """The state-dict prefix of a torchvision-unit layer: ``stage3_unit1_downsample_bn`` ->
    ``layer2.0.downsample.1``, ``stem_conv`` -> ``conv1``."""
    if layer_name in ("stem_conv", "stem_bn"):
        return {"stem_conv": "conv1", "stem_bn": "bn1"}[layer_name]
    match = re.fullmatch(r"stage(\d)_unit(\d+)_(conv1|conv2|bn1|bn2|downsample_conv|downsample_bn)",
                         layer_name)
    if match is None:
        raise KeyError(layer_name)
    stage, unit, part = match.groups()
    part = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(part, part)
    return f"layer{int(stage) - 1}.{int(unit) - 1}.{part}"


def weight_map(backbone: ResNet34Backbone) -> list[tuple[str, object, bool]]:
    """``(state-dict key, Keras variable, is a conv kernel)`` for every weight of ``backbone``.

    Conv kernels are OIHW in torch and HWIO in Keras; BN ``weight``/``bias``/``running_mean``/
    ``running_var`` are ``gamma``/``beta``/``moving_mean``/``moving_variance``.
    """
    mapped = []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        prefix = torch_key(layer.name)
        if hasattr(layer, "kernel"):
            mapped.append((f"{prefix}.weight", layer.kernel, True))
        else:
            mapped += [(f"{prefix}.weight", layer.gamma, False), (f"{prefix}.bias", layer.beta, False),
                       (f"{prefix}.running_mean", layer.moving_mean, False),
                       (f"{prefix}.running_var", layer.moving_variance, False)]
    return mapped


def load_torchvision_weights(backbone: ResNet34Backbone, path: str | os.PathLike) -> None:
    """Load torchvision's ``resnet34-*.pth`` or timm's ``resnet34.*`` ``model.safetensors``
    into a ``unit="torchvision"`` backbone (width 1.0, 3 input channels).

    ``fc.*`` and ``num_batches_tracked`` are ignored. Every tensor is checked before any is
    assigned, so a failed load leaves the backbone untouched; a missing key, a tensor of
    another shape or an unreadable file raises ``CellnetError`` naming the file and the key.
    """
    path = os.fspath(path)
    if backbone.unit != "torchvision":
        raise bad(path, f"torchvision/timm resnet34 weights fit the torchvision unit, not "
                        f"{backbone.unit!r} ({WRONG_UNIT})")
    state = read_state_dict(path)
    assignments = []
    for key, variable, is_kernel in weight_map(backbone):
        if key not in state:
            raise bad(path, f"key {key} missing ({EXPECTED})")
        value = np.asarray(state[key])
        expected = tuple(variable.shape)
        if is_kernel:
            expected = tuple(expected[i] for i in (3, 2, 0, 1))  # HWIO -> torch's OIHW
        if value.shape != expected:
            raise bad(path, f"{key} has shape {value.shape} but the backbone expects {expected} "
                            f"(resnet34 ImageNet weights fit width 1.0 and 3 input channels; this "
                            f"backbone has width {backbone.width}, {backbone.input_channels} channels)")
        if is_kernel:
            value = value.transpose(2, 3, 1, 0)
        assignments.append((variable, value.astype(variable.dtype)))
    for variable, value in assignments:
        variable.assign(value)
