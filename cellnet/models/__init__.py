"""Stage 2, models: what a network is (how it is run over data lives in the stages after it).

The ResNet34-ELU backbone (``backbone``), the FPN / U-Net decoders (``decoders``), the
segmentation task (``segmenter``) with its optional stain normalisation (``stain``), the
cellularity models (``cellularity``), the 81 map features (``features``) and the XGBoost
ensemble as TF ops (``gbt``). Importing this package
registers every custom Keras object these models save.
"""
from cellnet.models.backbone import ResNet34Backbone, load_backbone_weights
from cellnet.models.cellularity import (
    BIN_CENTRES,
    NUM_BINS,
    DirectCellularity,
    SRCascade,
    decode_bins,
    decode_bins_np,
)
from cellnet.models.decoders import (
    BilinearUpSampling2D,
    FreezableSpatialDropout2D,
    fpn_decoder,
    unet_decoder,
)
from cellnet.models.features import FEATURE_NAMES, FeatureExtractor, extract_features
from cellnet.models.gbt import GBTCellularity, GBTEnsemble
from cellnet.models.segmenter import FPN, CellSegmenter, Unet
from cellnet.models.stain import (
    MacenkoNormalization,
    ReinhardNormalization,
    fit_stain,
    stain_layer,
)

__all__ = [
    "BIN_CENTRES",
    "BilinearUpSampling2D",
    "FPN",
    "NUM_BINS",
    "CellSegmenter",
    "DirectCellularity",
    "FEATURE_NAMES",
    "GBTCellularity",
    "GBTEnsemble",
    "MacenkoNormalization",
    "ReinhardNormalization",
    "FeatureExtractor",
    "FreezableSpatialDropout2D",
    "ResNet34Backbone",
    "SRCascade",
    "Unet",
    "decode_bins",
    "decode_bins_np",
    "extract_features",
    "fit_stain",
    "fpn_decoder",
    "load_backbone_weights",
    "stain_layer",
    "unet_decoder",
]
