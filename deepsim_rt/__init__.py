"""deepsim_rt: a runtime for learned image registration with the DeepSim semantic similarity.

Layers (data flows down): data -> nn -> kernels -> losses -> train -> evaluate -> export -> runtime -> cli.
Conventions used everywhere:
  images       float (B, C, *spatial), intensities in [0, 1]; 2D spatial = (H, W), 3D = (D, H, W)
  displacement (B, ndim, *spatial) in voxel units; channel i moves along spatial axis i (tensor order);
               warped(p) = image(p + u(p)); align_corners=True (voxel centres at integer indices)
"""

__version__ = "0.1.0"
