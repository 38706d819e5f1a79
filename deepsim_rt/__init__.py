"""deepsim_rt: a runtime for learned image registration with the DeepSim semantic similarity.

Floors, lowest first (a module imports its own floor and below; tests/test_layers.py enforces it):
  _io/_checks -> kernels -> data, nn, losses -> transforms -> export -> refine -> runtime -> train, evaluate
  -> pipeline (files on disk) -> anomaly, realbench -> cli.
Conventions used everywhere:
  images       float (B, C, *spatial), intensities in [0, 1]; 2D spatial = (H, W), 3D = (D, H, W)
  displacement (B, ndim, *spatial) in voxel units; channel i moves along spatial axis i (tensor order);
               warped(p) = image(p + u(p)); align_corners=True (voxel centres at integer indices)
"""

__version__ = "0.1.0"
