"""The shapes every suite benchmarks: one place, so roofline tests (tests/test_roofline.py) check the same ones.

GPU sizes fill an H100/H200: the 3D brain volume 160x192x224 of the kernels issue and a 2D batch of 1024^2 images.
CPU sizes are small so that `make bench` finishes in minutes on 2 cores.

DeepSim feature pyramids are those of the paper's feature extractor (NetConfig preset "paper": 2D widths
64/128/256, 3D 32/64/128); encoder stage l outputs enc[l] channels at 1/2**(l+1) of the image size
(deepsim_rt.nn.unet: every stage starts with a stride-2 convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

from deepsim_rt.nn.config import NetConfig

__all__ = ["KernelSize", "KERNEL_SIZES", "INFER_SIZES", "TRAIN_SIZES", "feature_levels", "STEPS"]

STEPS = 7  # scaling-and-squaring steps (deepsim_rt.kernels.reference.DEFAULT_STEPS)


def feature_levels(batch: int, spatial: tuple[int, ...], preset: str = "paper") -> tuple[tuple[int, ...], ...]:
    """(B, C_l, *S / 2**(l+1)) for each encoder stage of the `preset` segmentation extractor."""
    cfg = NetConfig.make("seg", len(spatial), preset, n_classes=2)
    if any(s % cfg.spatial_multiple for s in spatial):
        raise ValueError(f"spatial size {spatial} must be a multiple of {cfg.spatial_multiple}")
    return tuple((batch, c, *(s // 2 ** (lvl + 1) for s in spatial)) for lvl, c in enumerate(cfg.enc_channels))


@dataclass(frozen=True)
class KernelSize:
    """One size of the kernel suite: images (batch, 1, *spatial), flows (batch, ndim, *spatial)."""

    name: str
    batch: int
    spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def image(self) -> tuple[int, ...]:
        return (self.batch, 1, *self.spatial)

    @property
    def flow(self) -> tuple[int, ...]:
        return (self.batch, self.ndim, *self.spatial)

    @property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        return feature_levels(self.batch, self.spatial)


# device type -> sizes
KERNEL_SIZES: dict[str, tuple[KernelSize, ...]] = {
    # 3D first on the GPU: the targets are stated at the brain size, and a time box cuts the tail of a suite.
    "cuda": (KernelSize("3d", 1, (160, 192, 224)), KernelSize("2d", 4, (1024, 1024))),
    "cpu": (KernelSize("2d", 2, (256, 256)), KernelSize("3d", 1, (48, 56, 64))),
}

# End-to-end registration inference (batch 1 pairs). CPU: the bundled atlas grid (2D 1 mm slice 192x160, 3D at
# 2 mm 80x96x80). GPU: the 1 mm slice and the 3D brain size of the issues (one size each: every backend compiles or
# exports per case, and `make gpu-check` has 8 minutes).
INFER_SIZES: dict[str, dict[int, tuple[tuple[int, ...], ...]]] = {
    "cuda": {2: ((192, 160),), 3: ((160, 192, 224),)},
    "cpu": {2: ((192, 160),), 3: ((80, 96, 80),)},
}

# Training step of the registration net: (preset, batch, spatial) per ndim.
TRAIN_SIZES: dict[str, dict[int, tuple[str, int, tuple[int, ...]]]] = {
    "cuda": {2: ("paper", 8, (256, 256)), 3: ("paper", 1, (160, 192, 224))},
    "cpu": {2: ("small", 2, (96, 80)), 3: ("small", 1, (32, 32, 32))},
}
