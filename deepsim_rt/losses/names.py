"""The similarity names, torch-free: `deepsim-rt train-* --help` and `study --help` list them (train.config)
without importing torch (issue 20: 1.8-3.8 s of every such help). deepsim_rt.losses.registry builds them."""

__all__ = ["SIMILARITIES"]

SIMILARITIES = ("mse", "ncc", "ncc_sup", "vgg", "deepsim_seg", "deepsim_ae", "mind")
