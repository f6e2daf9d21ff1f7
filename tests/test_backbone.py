"""ResNet34-ELU backbone: pyramid strides, unit variants, naming, config, local weight loading."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from cellnet.errors import CellnetError
from cellnet.models import CellSegmenter, ResNet34Backbone, load_backbone_weights

TINY = 0.125


def _images(n: int = 2, h: int = 64, w: int = 96, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, c)).astype("float32")


@pytest.mark.parametrize("unit", ["preact", "authors", "torchvision"])
def test_pyramid_taps_have_strides_4_to_32(unit):
    backbone = ResNet34Backbone(unit=unit, width=TINY)
    assert list(backbone.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
    taps = keras.Model(backbone.input, backbone.pyramid_outputs)(_images(h=64, w=96))
    for level, filters in zip(("P2", "P3", "P4", "P5"), (16, 16, 32, 64)):
        stride = 2 ** int(level[1])
        assert tuple(taps[level].shape) == (2, 64 // stride, 96 // stride, filters)
    # The model's own output is P5.
    np.testing.assert_allclose(backbone(_images()).numpy(), taps["P5"].numpy(), rtol=1e-6, atol=1e-6)


def test_preact_units_order_shortcuts_and_names():
    backbone = ResNet34Backbone(unit="preact", width=TINY)
    names = [layer.name for layer in backbone.layers]
    assert len(names) == len(set(names))
    # [3, 4, 6, 3] units, each with two 3x3 convs, named stage<s>_unit<u>_conv<k>.
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for unit in range(1, blocks + 1):
            for k in (1, 2):
                conv = backbone.get_layer(f"stage{stage}_unit{unit}_conv{k}")
                assert conv.kernel_size == (3, 3) and not conv.use_bias
        assert f"stage{stage}_unit{blocks + 1}_conv1" not in names
    # Projection only where stride or width changes: not in stage 2 (64 -> 64, stride 1).
    shortcuts = sorted(n for n in names if n.endswith("_shortcut"))
    assert shortcuts == ["stage3_unit1_shortcut", "stage4_unit1_shortcut", "stage5_unit1_shortcut"]
    assert all(backbone.get_layer(n).kernel_size == (1, 1) for n in shortcuts)
    assert backbone.get_layer("stage3_unit1_conv1").strides == (2, 2)
    # BN -> ELU -> conv: the first conv of a unit reads the unit's ELU.
    conv = backbone.get_layer("stage2_unit3_conv1")
    assert conv.input._keras_history[0].name == "stage2_unit3_elu1"
    elu = backbone.get_layer("stage2_unit3_elu1")
    assert isinstance(elu.input._keras_history[0], keras.layers.BatchNormalization)
    assert backbone.get_layer("stage2_unit3_elu1").activation.__name__ == "elu"


def test_authors_units_conv_elu_bn_and_3x3_projections():
    backbone = ResNet34Backbone(unit="authors", width=TINY)
    names = [layer.name for layer in backbone.layers]
    shortcuts = sorted(n for n in names if n.endswith("_shortcut_conv"))
    assert shortcuts == [f"stage{s}_unit1_shortcut_conv" for s in range(2, 6)]
    assert all(backbone.get_layer(n).kernel_size == (3, 3) for n in shortcuts)
    # conv -> ELU -> BN.
    bn = backbone.get_layer("stage4_unit2_bn1")
    assert bn.input._keras_history[0].name == "stage4_unit2_elu1"
    assert backbone.get_layer("stage4_unit2_elu1").input._keras_history[0].name == "stage4_unit2_conv1"


def _source(layer: keras.layers.Layer) -> str:
    return layer.input._keras_history[0].name


def test_torchvision_units_conv_bn_elu_with_pytorch_padding_and_names():
    backbone = ResNet34Backbone(unit="torchvision", width=TINY)
    names = [layer.name for layer in backbone.layers]
    assert len(names) == len(set(names))
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 2 * 16 + 3 and not any(conv.use_bias for conv in convs)
    bns = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == len(convs)
    assert all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)
    # Stem: symmetric pad 3 -> 7x7/2 valid -> BN -> ELU -> pad 1 with -inf -> 3x3/2 valid pool.
    stem = backbone.get_layer("stem_conv")
    assert (stem.kernel_size, stem.strides, stem.padding) == ((7, 7), (2, 2), "valid")
    assert _source(stem) == "stem_conv_pad"
    assert backbone.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    pool = backbone.get_layer("stem_pool")
    assert (pool.pool_size, pool.strides, pool.padding) == ((3, 3), (2, 2), "valid")
    assert _source(pool) == "stem_pool_pad" and _source(backbone.get_layer("stem_pool_pad")) == "stem_elu"
    # Downsample (1x1/2 conv -> BN) in the first unit of stages 3-5 only.
    downsample = sorted(n for n in names if n.endswith("_downsample_conv"))
    assert downsample == [f"stage{s}_unit1_downsample_conv" for s in range(3, 6)]
    for name in downsample:
        conv = backbone.get_layer(name)
        assert (conv.kernel_size, conv.strides, conv.padding) == ((1, 1), (2, 2), "valid")
        assert _source(backbone.get_layer(name.replace("_conv", "_bn"))) == name
    # Strided 3x3: explicit pad 1 + valid; stride 1: "same" (which is pad 1 on both sides).
    conv = backbone.get_layer("stage4_unit1_conv1")
    assert (conv.strides, conv.padding, _source(conv)) == ((2, 2), "valid", "stage4_unit1_conv1_pad")
    assert backbone.get_layer("stage4_unit1_conv1_pad").padding == ((1, 1), (1, 1))
    assert backbone.get_layer("stage4_unit2_conv1").padding == "same"
    # conv -> BN -> ELU -> conv -> BN, add, ELU.
    assert _source(backbone.get_layer("stage4_unit2_bn1")) == "stage4_unit2_conv1"
    assert _source(backbone.get_layer("stage4_unit2_elu1")) == "stage4_unit2_bn1"
    assert _source(backbone.get_layer("stage4_unit2_conv2")) == "stage4_unit2_elu1"
    add = backbone.get_layer("stage4_unit2_add")
    assert sorted(t._keras_history[0].name for t in add.input) == ["stage4_unit1_out", "stage4_unit2_bn2"]
    assert _source(backbone.get_layer("stage4_unit2_out")) == "stage4_unit2_add"
    assert [_source(l) for l in (backbone.get_layer(f"stage{s}_unit1_conv1_pad") for s in (3, 4, 5))] \
        == ["stage2_unit3_out", "stage3_unit4_out", "stage4_unit6_out"]


@pytest.mark.parametrize("size", [31, 32, 33, 35, 64])
def test_torchvision_unit_output_sizes_follow_pytorch(size):
    """floor((n + 2p - k) / s) + 1 at every stride-2 step, odd and even sizes alike."""
    def pytorch(n, k, s, p):
        return (n + 2 * p - k) // s + 1

    backbone = ResNet34Backbone(unit="torchvision", width=TINY)
    taps = keras.Model(backbone.input, backbone.pyramid_outputs)(_images(n=1, h=size, w=size + 1))
    h, w = pytorch(size, 7, 2, 3), pytorch(size + 1, 7, 2, 3)
    h, w = pytorch(h, 3, 2, 1), pytorch(w, 3, 2, 1)
    assert taps["P2"].shape[1:3] == (h, w)
    for level in ("P3", "P4", "P5"):
        h, w = pytorch(h, 3, 2, 1), pytorch(w, 3, 2, 1)
        assert taps[level].shape[1:3] == (h, w)


def test_stem_pool_pads_with_minus_infinity_not_zeros():
    from cellnet.models.backbone import NegInfPadding2D

    x = np.full((1, 4, 4, 2), -0.5, "float32")
    x[0, 0, 0] = -0.25
    padded = NegInfPadding2D(1)(x)
    pooled = keras.layers.MaxPooling2D(3, strides=2)(padded).numpy()
    np.testing.assert_array_equal(pooled[0, :, :, 0], [[-0.25, -0.5], [-0.5, -0.5]])


def test_torchvision_unit_any_width_and_channels():
    backbone = ResNet34Backbone(input_channels=5, unit="torchvision", width=0.3)
    assert backbone(_images(n=1, c=5)).shape == (1, 2, 3, 160)
    assert all(conv.filters % 16 == 0 for conv in backbone.layers if isinstance(conv, keras.layers.Conv2D))


def test_imagenet_input_norm_layer_values_and_arguments():
    backbone = ResNet34Backbone(unit="torchvision", width=TINY, input_norm="imagenet")
    norm = backbone.get_layer("imagenet_norm")
    assert _source(backbone.get_layer("stem_conv_pad")) == "imagenet_norm"
    x = np.array([[[[-1.0, 0.0, 1.0]]]], "float32")
    expected = (np.array([0.0, 0.5, 1.0]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(norm(x).numpy()[0, 0, 0], expected, rtol=1e-6)
    assert "imagenet_norm" not in [layer.name for layer in ResNet34Backbone(width=TINY).layers]
    with pytest.raises(CellnetError, match="input_norm 'caffe'"):
        ResNet34Backbone(width=TINY, input_norm="caffe")
    with pytest.raises(CellnetError, match="needs 3 RGB input channels, not 4"):
        ResNet34Backbone(input_channels=4, width=TINY, input_norm="imagenet")


def test_configs_without_input_norm_mean_none():
    config = ResNet34Backbone(unit="authors", width=TINY).get_config()
    assert config["input_norm"] == "none"
    del config["input_norm"]  # as written before it existed
    assert ResNet34Backbone.from_config(config).input_norm == "none"


def test_torchvision_unit_with_imagenet_norm_round_trips_through_keras_file(tmp_path):
    backbone = ResNet34Backbone(unit="torchvision", width=TINY, input_norm="imagenet", name="enc")
    path = tmp_path / "torchvision.keras"
    backbone.save(path)
    clone = keras.saving.load_model(path)
    assert isinstance(clone, ResNet34Backbone) and clone.get_config() == backbone.get_config()
    assert clone.unit == "torchvision" and clone.input_norm == "imagenet"
    x = _images(h=35, w=32)
    np.testing.assert_array_equal(clone(x).numpy(), backbone(x).numpy())


def test_paper_size_parameter_count_matches_resnet34_arithmetic():
    """Independent count of a pre-activation ResNet34 (no conv biases) at width 1.0."""
    expected = 7 * 7 * 3 * 64 + 4 * 64  # stem conv + BN
    channels = 64
    for blocks, filters in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for block in range(blocks):
            expected += 4 * channels + 9 * channels * filters + 4 * filters + 9 * filters * filters
            if block == 0 and filters != channels:
                expected += channels * filters  # 1x1 projection
            channels = filters
    expected += 4 * 512  # post BN
    assert ResNet34Backbone().count_params() == expected


def test_width_rounds_to_multiples_of_16():
    backbone = ResNet34Backbone(width=0.01)
    assert backbone.get_layer("stem_conv").filters == 16
    assert backbone.output.shape[-1] == 16
    assert ResNet34Backbone(width=0.3).output.shape[-1] == 160  # 153.6 -> nearest multiple of 16


@pytest.mark.parametrize("width", [0.01, 0.1, 0.125, 0.2, 0.3, 0.37, 0.5, 1.0])
def test_no_width_reaches_a_channel_count_off_the_multiple(width):
    """Every convolution of every model a width can build has 16k output channels (oneDNN)."""
    from cellnet.models import CellSegmenter, DirectCellularity

    models = [CellSegmenter(ResNet34Backbone(width=width), decoder=d) for d in ("fpn", "unet")]
    models.append(DirectCellularity("resnet34", "regression", input_shape=(64, 64, 3), width=width))
    for model in models:
        pending, convs = [model], []
        while pending:
            layer = pending.pop()
            pending += getattr(layer, "layers", [])
            if isinstance(layer, keras.layers.Conv2D) and layer.filters != 4:  # 4: the class maps
                convs.append(layer)
        assert convs and all(c.filters % 16 == 0 for c in convs), \
            sorted({c.filters for c in convs})


def test_models_saved_before_the_channel_multiple_keep_their_shapes():
    config = ResNet34Backbone(width=0.125).get_config()
    del config["channel_multiple"]  # as written by cellnet 0.1.0
    old = ResNet34Backbone.from_config(config)
    assert old.get_layer("stem_conv").filters == 8 and old.channel_multiple is None


def test_width_0125_trains_where_onednn_crashed_on_avx512(tmp_path):
    """The issue-10 reproduction, in a child process so a native crash fails only this test.

    On AVX-512 CPUs the 8-channel build of this model died with SIGSEGV in the first step.
    """
    import subprocess
    import sys

    script = (
        "import numpy as np, keras\n"
        "from cellnet.models import DirectCellularity\n"
        "m = DirectCellularity(arch='resnet34', head='regression', width=0.125, input_shape=(256, 256, 3))\n"
        "m.compile(optimizer='adam', loss='mse')\n"
        "x = np.random.default_rng(0).uniform(-1, 1, (4, 256, 256, 3)).astype('float32')\n"
        "loss = m.train_on_batch(x, np.full((4, 1), 0.5, 'float32'))\n"
        "print('loss', float(np.ravel(loss)[0]))\n"
    )
    env = {**__import__("os").environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "loss" in result.stdout


def test_input_channels_and_bad_arguments():
    assert ResNet34Backbone(input_channels=4, width=TINY)(_images(c=4)).shape[-1] == 64
    with pytest.raises(CellnetError, match="unit"):
        ResNet34Backbone(unit="postact")
    with pytest.raises(CellnetError):
        ResNet34Backbone(width=0)


@pytest.mark.parametrize("unit", ["preact", "authors", "torchvision"])
def test_stage_blocks_set_the_units_per_stage_and_reload(unit, tmp_path):
    from cellnet.models import DirectCellularity

    small = ResNet34Backbone(unit=unit, width=TINY, stage_blocks=(1, 2, 1, 1))
    units = {layer.name.split("_")[0] + "_" + layer.name.split("_")[1] for layer in small.layers
             if layer.name.startswith("stage")}
    assert units == {"stage2_unit1", "stage3_unit1", "stage3_unit2", "stage4_unit1", "stage5_unit1"}
    assert set(small.pyramid_outputs) == {"P2", "P3", "P4", "P5"}
    assert small(_images()).shape == ResNet34Backbone(unit=unit, width=TINY)(_images()).shape
    assert small.count_params() < ResNet34Backbone(unit=unit, width=TINY).count_params()
    assert ResNet34Backbone.from_config(small.get_config()).count_params() == small.count_params()
    # the models built on it keep it in their .keras files
    model = DirectCellularity("resnet34", input_shape=(64, 64, 3), width=TINY, unit=unit, stage_blocks=(1, 1, 1, 1))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert again.stage_blocks == (1, 1, 1, 1) and again.count_params() == model.count_params()
    # files saved before the argument existed are ResNet34s
    config = ResNet34Backbone(width=TINY).get_config()
    del config["stage_blocks"]
    assert ResNet34Backbone.from_config(config).stage_blocks == (3, 4, 6, 3)
    for bad in ((1, 1, 1), (1, 0, 1, 1), (1.5, 1, 1, 1)):
        with pytest.raises(CellnetError, match="stage_blocks .*expected 4 positive integers"):
            ResNet34Backbone(stage_blocks=bad)


def test_imagenet_init_needs_resnet34s_units():
    from cellnet.training.config import make_config

    with pytest.raises(CellnetError, match="ImageNet files are ResNet34s"):
        make_config("segmentation", data="d", run="r", init="imagenet:w.pth", unit="torchvision",
                    stage_blocks=(1, 1, 1, 1)).resolve()


def test_config_round_trip_rebuilds_the_same_network():
    backbone = ResNet34Backbone(
        input_channels=4, unit="authors", width=TINY, name="enc", trainable=False
    )
    config = backbone.get_config()
    clone = ResNet34Backbone.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == backbone.count_params()
    # trainable=False reaches every layer (Keras skips re-assigning an unchanged flag).
    assert clone.trainable_weights == [] and all(not layer.trainable for layer in clone.layers)
    clone.set_weights(backbone.get_weights())
    x = _images(c=4)
    np.testing.assert_allclose(clone(x).numpy(), backbone(x).numpy(), rtol=1e-6, atol=1e-6)


def test_load_weights_file_from_same_config(tmp_path):
    source = ResNet34Backbone(width=TINY)
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    target = ResNet34Backbone(width=TINY)
    x = _images()
    assert not np.allclose(target(x).numpy(), source(x).numpy())
    load_backbone_weights(target, path)
    np.testing.assert_allclose(target(x).numpy(), source(x).numpy(), rtol=1e-6, atol=1e-6)


def test_load_weights_by_layer_name_from_a_saved_model(tmp_path):
    """A model holding two encoders with the same layer names (like a saved SR cascade):
    each target loads whole from the one that fits, never a mix of both."""
    first, second = ResNet34Backbone(width=TINY), ResNet34Backbone(input_channels=4, width=TINY)
    rgb, maps = keras.Input((None, None, 3)), keras.Input((None, None, 4))
    path = tmp_path / "two_encoders.keras"
    keras.Model([rgb, maps], [first(rgb), second(maps)]).save(path)
    for source in (first, second):
        target = ResNet34Backbone(input_channels=source.input_channels, width=TINY)
        load_backbone_weights(target, path)
        for ours, theirs in zip(target.weights, source.weights):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_load_weights_errors_name_the_file_and_how_to_make_one(tmp_path):
    target = ResNet34Backbone(width=TINY)
    before = [w.numpy().copy() for w in target.weights]
    with pytest.raises(CellnetError, match=r"missing\.weights\.h5: no such file.*save_weights"):
        load_backbone_weights(target, tmp_path / "missing.weights.h5")

    wider = tmp_path / "wider.weights.h5"
    ResNet34Backbone(width=0.25).save_weights(wider)
    with pytest.raises(CellnetError, match=r"wider\.weights\.h5: holds 172 arrays that do not fit"):
        load_backbone_weights(target, wider)

    # Keras alone would load this one partially without complaint.
    segmenter_weights = tmp_path / "segmenter.weights.h5"
    CellSegmenter(ResNet34Backbone(width=TINY)).save_weights(segmenter_weights)
    with pytest.raises(CellnetError, match="do not fit"):
        load_backbone_weights(target, segmenter_weights)

    not_hdf5 = tmp_path / "broken.weights.h5"
    not_hdf5.write_bytes(b"not hdf5")
    with pytest.raises(CellnetError, match="not an HDF5 weights file"):
        load_backbone_weights(target, not_hdf5)

    other_model = tmp_path / "other.keras"
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="dense")]).save(other_model)
    with pytest.raises(CellnetError, match=r"other\.keras: \d+ backbone layers missing"):
        load_backbone_weights(target, other_model)

    authors_model = tmp_path / "authors.keras"
    ResNet34Backbone(unit="authors", width=TINY).save(authors_model)
    with pytest.raises(CellnetError, match="other weight shapes"):
        load_backbone_weights(target, authors_model)

    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(CellnetError, match="unknown weights format"):
        load_backbone_weights(target, text)

    # Failed loads leave the backbone untouched.
    for weight, value in zip(target.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)
