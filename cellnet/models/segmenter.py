"""The nuclei segmentation task: ResNet34-ELU encoder + FPN or U-Net decoder (paper 3.1)."""
from __future__ import annotations

import keras

from cellnet.errors import CellnetError
from cellnet.models.backbone import ResNet34Backbone, scaled_filters, set_trainable
from cellnet.models.decoders import fpn_decoder, unet_decoder
from cellnet.models.stain import stain_layer

DECODERS: tuple[str, ...] = ("fpn", "unet")
#: Decoder widths at backbone width 1.0; they scale with the backbone's width.
FPN_PYRAMID_FILTERS = 64
FPN_TOP_DOWN_FILTERS = 256
UNET_FILTERS: tuple[int, ...] = (256, 128, 64, 32, 16)


@keras.saving.register_keras_serializable(package="cellnet")
class CellSegmenter(keras.Model):
    """Per-pixel probabilities of normal, lymphocyte, malignant and background nuclei.

    The decoder runs on the backbone's pyramid (``P2..P5``); its layers and the backbone's
    share one functional graph, so ``segmenter.backbone.trainable = False`` freezes the
    encoder. Decoder widths scale with ``backbone.width`` (64 maps per FPN level at 1.0).

    Args:
        backbone: a ``ResNet34Backbone``; its input channels are the model's.
        decoder: ``"fpn"`` (the paper's model) or ``"unet"`` (its "standard decoder").
        num_classes: output channels (4: ``cellnet.classes.CLASSES``).
        activation: final activation, ``"sigmoid"`` in the paper (classes may overlap).
        dropout: SpatialDropout2D rate on the decoder's stride-4 maps (0.5 in the paper).
        stain_norm: ``None`` or ``{"method": "reinhard" | "macenko", "params": fit_stain(...)}``:
            a fitted stain normalisation layer (``stain_norm``, ``cellnet.models.stain``) runs on
            the input before the encoder, so every caller of the model (evaluation, the SR
            cascade, the GBT, the SavedModel) normalises as training did.
        **kwargs: passed to ``keras.Model`` (``name``, ``trainable``, ``dtype``).

    Inputs are float images scaled to [-1, 1], shape ``(N, H, W, 3)`` with H and W
    multiples of 32; the output, named ``masks``, is ``(N, H, W, num_classes)`` float32.

    Example:
    ```python
    import numpy as np
    from cellnet.models import CellSegmenter, ResNet34Backbone

    segmenter = CellSegmenter(ResNet34Backbone(width=0.125), decoder="fpn")
    masks = segmenter.predict(np.zeros((2, 64, 64, 3), "float32"), verbose=0)
    assert masks.shape == (2, 64, 64, 4)
    ```
    """

    def __init__(
        self,
        backbone: ResNet34Backbone,
        decoder: str = "fpn",
        num_classes: int = 4,
        activation: str = "sigmoid",
        dropout: float = 0.5,
        stain_norm: dict | None = None,
        **kwargs,
    ):
        if decoder not in DECODERS:
            raise CellnetError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
        if not 0.0 <= dropout < 1.0:
            raise CellnetError(f"dropout {dropout}: expected a rate in [0, 1)")
        trainable = kwargs.pop("trainable", True)

        # === Layers ===
        self.backbone = backbone
        stain = _stain_layer(stain_norm)

        # === Functional Model ===
        inputs, image, pyramid = _encoder_graph(backbone, stain)
        if decoder == "fpn":
            outputs = fpn_decoder(
                pyramid,
                num_classes=num_classes,
                pyramid_filters=scaled_filters(FPN_PYRAMID_FILTERS, backbone.width, backbone.channel_multiple),
                top_down_filters=scaled_filters(FPN_TOP_DOWN_FILTERS, backbone.width, backbone.channel_multiple),
                dropout=dropout,
                activation=activation,
            )
        else:
            outputs = unet_decoder(
                pyramid,
                image,
                num_classes=num_classes,
                filters=tuple(scaled_filters(f, backbone.width, backbone.channel_multiple)
                             for f in UNET_FILTERS),
                dropout=dropout,
                activation=activation,
            )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        if not trainable:
            set_trainable(self, False)

        # === Config ===
        self.decoder = decoder
        self.num_classes = num_classes
        self.activation = activation
        self.dropout = dropout
        self.stain_norm = None if stain is None else {"method": stain_norm["method"], "params": stain.params}

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "decoder": self.decoder,
            "num_classes": self.num_classes,
            "activation": self.activation,
            "dropout": self.dropout,
            "stain_norm": self.stain_norm,
        }

    @classmethod
    def from_config(cls, config: dict) -> "CellSegmenter":
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def _encoder_graph(backbone: ResNet34Backbone, stain: keras.layers.Layer | None):
    """(model input, image the decoder sees, pyramid) without or with stain normalisation.

    Without, the backbone's own graph is the segmenter's (its layers at the top level, as
    in files saved before stain normalisation). With, the backbone's pyramid runs as one
    nested model on the normalised image; its layers are the backbone's own objects, so
    freezing ``segmenter.backbone`` still freezes the encoder.
    """
    if stain is None:
        return backbone.input, backbone.input, backbone.pyramid_outputs
    inputs = keras.Input(shape=backbone.input.shape[1:], name="image")
    image = stain(inputs)
    pyramid = keras.Model(backbone.input, backbone.pyramid_outputs, name=f"{backbone.name}_pyramid")
    return inputs, image, pyramid(image)


def _stain_layer(stain_norm: dict | None) -> keras.layers.Layer | None:
    """The ``stain_norm`` argument's layer (None for no normalisation)."""
    if stain_norm is None:
        return None
    if not isinstance(stain_norm, dict) or "method" not in stain_norm:
        raise CellnetError(f"stain_norm {stain_norm!r}: expected None or "
                           "{'method': 'none' | 'reinhard' | 'macenko', 'params': {...}}")
    return stain_layer(stain_norm["method"], stain_norm.get("params", {}))


def _build(decoder: str, backbone: ResNet34Backbone | None, classes: int, activation: str,
           width: float, unit: str) -> CellSegmenter:
    if backbone is None:
        backbone = ResNet34Backbone(input_channels=3, unit=unit, width=width)
    return CellSegmenter(backbone, decoder=decoder, num_classes=classes, activation=activation)


def FPN(backbone: ResNet34Backbone | None = None, classes: int = 4, activation: str = "sigmoid",
        width: float = 1.0, unit: str = "preact") -> CellSegmenter:
    """The paper's segmenter: ResNet34-ELU encoder (built unless given) + FPN decoder."""
    return _build("fpn", backbone, classes, activation, width, unit)


def Unet(backbone: ResNet34Backbone | None = None, classes: int = 4, activation: str = "sigmoid",
         width: float = 1.0, unit: str = "preact") -> CellSegmenter:
    """The Table 1 ablation: ResNet34-ELU encoder (built unless given) + U-Net decoder."""
    return _build("unet", backbone, classes, activation, width, unit)
