"""The three hot ops, dispatched by device: CUDA tensors -> Triton kernels, CPU -> the PyTorch reference.

Public API (everything else in the package calls these, so training and inference pick up the kernels):
  multilayer_cosine(feats_a, feats_b, eps=1e-6, reduction="mean"|"none")
  warp(image, flow, mode="linear"|"nearest", padding="border"|"zeros")
  integrate(velocity, steps=7)
"""

from deepsim_rt.kernels.dispatch import integrate, multilayer_cosine, warp

__all__ = ["multilayer_cosine", "warp", "integrate"]
