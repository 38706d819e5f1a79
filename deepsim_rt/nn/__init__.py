"""Networks: the paper's U-Net backbone, SegNet / AutoEncoder feature extractors, RegNet; configs; checkpoints."""

from deepsim_rt._io import file_sha256  # re-exported: the hash recorded with every checkpoint and export
from deepsim_rt.nn.checkpoint import atomic_write, load_config, load_model, read_metadata, save_model
from deepsim_rt.nn.config import NetConfig
from deepsim_rt.nn.unet import AutoEncoder, FeatureExtractor, RegNet, SegNet, UNet, build_model

__all__ = [
    "NetConfig", "UNet", "FeatureExtractor", "SegNet", "AutoEncoder", "RegNet", "build_model",
    "save_model", "load_model", "load_config", "read_metadata", "atomic_write", "file_sha256",
]
