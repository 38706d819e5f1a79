"""The paper's dimension-agnostic U-Net backbone and the three models built on it.

Encoder stage l (output at 1/2**l resolution):
    [BatchNorm on the stage input] -> conv k4 s2 p1 -> LeakyReLU(0.2) -> conv k3 p1 -> LeakyReLU(0.2) -> [dropout]
Decoder stage (from the deepest level up):
    conv k3 -> LReLU -> conv k3 -> LReLU -> [dropout] -> upsample x2 (linear, align_corners=False) -> concat skip
The encoder outputs (after the activation, before dropout is irrelevant in eval) are the DeepSim feature levels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepsim_rt._checks import check_float, check_spatial_ndim
from deepsim_rt.kernels import integrate, warp
from deepsim_rt.nn.config import NetConfig

_LRELU = 0.2


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _bn(ndim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


def _dropout(ndim: int, p: float) -> nn.Module:
    if p == 0.0:
        return nn.Identity()
    return nn.Dropout2d(p) if ndim == 2 else nn.Dropout3d(p)


class EncoderStage(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.norm = _bn(ndim)(cin)
        self.down = conv(cin, cout, kernel_size=4, stride=2, padding=1)
        self.conv = conv(cout, cout, kernel_size=3, padding=1)
        self.drop = _dropout(ndim, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features after the last LeakyReLU, the same after dropout for the next stage)."""
        x = F.leaky_relu(self.down(self.norm(x)), _LRELU)
        feat = F.leaky_relu(self.conv(x), _LRELU)
        return feat, self.drop(feat)


class DecoderStage(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.conv1 = conv(cin, cout, kernel_size=3, padding=1)
        self.conv2 = conv(cout, cout, kernel_size=3, padding=1)
        self.drop = _dropout(ndim, dropout)
        self.mode = "bilinear" if ndim == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv1(x), _LRELU)
        x = self.drop(F.leaky_relu(self.conv2(x), _LRELU))
        return F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=False)


class UNet(nn.Module):
    """Backbone: in_ch at full resolution -> decoder output at full resolution (head_in channels).

    forward(x) returns (decoder output (B, dec[-1] + skip channels, *S), encoder features list, one per stage).
    """

    def __init__(self, cfg: NetConfig, in_channels: int) -> None:
        super().__init__()
        nd, enc, dec = cfg.ndim, cfg.enc_channels, cfg.dec_channels
        self.skips = cfg.skips
        self.encoders = nn.ModuleList()
        cin = in_channels
        for c in enc:
            self.encoders.append(EncoderStage(nd, cin, c, cfg.dropout))
            cin = c
        self.decoders = nn.ModuleList()
        # Skip sources, deepest first: encoder outputs enc[-2], ..., enc[0], then the network input itself.
        skip_ch = [*reversed(enc[:-1]), in_channels]
        for c, s in zip(dec, skip_ch, strict=True):
            self.decoders.append(DecoderStage(nd, cin, c, cfg.dropout))
            cin = c + (s if self.skips else 0)
        self.out_channels = cin

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.encoders:
            feat, x = stage(x)
            feats.append(feat)
        return feats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = [x]
        feats = []
        h = x
        for stage in self.encoders:
            feat, h = stage(h)
            feats.append(feat)
            skips.append(h)
        skips = skips[:-1]  # the deepest output is the decoder input, not a skip
        for stage in self.decoders:
            h = stage(h)
            skip = skips.pop()
            if self.skips:
                h = torch.cat([h, skip], dim=1)
        return h, feats


def _head(ndim: int, cin: int, width: int, cout: int, last_kernel: int) -> nn.Sequential:
    conv = _conv(ndim)
    return nn.Sequential(
        conv(cin, width, 3, padding=1), nn.LeakyReLU(_LRELU),
        conv(width, width, 3, padding=1), nn.LeakyReLU(_LRELU),
        conv(width, cout, last_kernel, padding=last_kernel // 2),
    )


class _Base(nn.Module):
    """Input checks shared by every model: (B, C, *S) float, spatial dims = cfg.ndim, sizes a multiple."""

    cfg: NetConfig

    def check_input(self, name: str, x: torch.Tensor, channels: int) -> None:
        check_float(name, x)
        nd = check_spatial_ndim(name, x)
        if nd != self.cfg.ndim:
            raise ValueError(f"{name}: this is a {self.cfg.ndim}D model, got a {nd}D input of shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{name}: expected {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        m = self.cfg.spatial_multiple
        # Under tracing (export) sizes may be symbolic; the check then runs on the concrete call only.
        if not torch.compiler.is_compiling() and any(int(s) % m for s in x.shape[2:]):
            raise ValueError(f"{name}: spatial size {tuple(x.shape[2:])} must be a multiple of {m} for this network "
                             f"({len(self.cfg.enc_channels)} stages); pad it (deepsim_rt.runtime pads and crops)")


class FeatureExtractor(_Base):
    """Common part of SegNet and AutoEncoder: `extract_features(x)` returns the encoder levels (DeepSim)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = UNet(cfg, cfg.in_channels)

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, *S) -> [ (B, enc[l], *S / 2**(l+1)) for each encoder stage l ], after LeakyReLU."""
        self.check_input("image", x, self.cfg.in_channels)
        return self.backbone.encode(x)


class SegNet(FeatureExtractor):
    """Segmentation model (DeepSim_seg's surrogate task): image -> class logits (B, n_classes, *S)."""

    def __init__(self, cfg: NetConfig) -> None:
        if cfg.kind != "seg":
            raise ValueError(f"SegNet needs a config of kind 'seg', got {cfg.kind!r}")
        super().__init__(cfg)
        self.head = _head(cfg.ndim, self.backbone.out_channels, cfg.head_channels, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input("image", x, self.cfg.in_channels)
        h, _ = self.backbone(x)
        return self.head(h)


class AutoEncoder(FeatureExtractor):
    """Autoencoder (DeepSim_ae's surrogate task, no skips): image -> reconstruction in [0, 1] (sigmoid)."""

    def __init__(self, cfg: NetConfig) -> None:
        if cfg.kind != "ae":
            raise ValueError(f"AutoEncoder needs a config of kind 'ae', got {cfg.kind!r}")
        super().__init__(cfg)
        self.head = _head(cfg.ndim, self.backbone.out_channels, cfg.head_channels, cfg.out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input("image", x, self.cfg.in_channels)
        h, _ = self.backbone(x)
        return torch.sigmoid(self.head(h))


class RegNet(_Base):
    """Registration network: (moving, fixed) -> (warped moving, displacement).

    Input channels are concat(moving, fixed). The last conv starts at N(0, 1e-5) weights and zero bias, so the
    initial displacement is ~0 (near-identity). With cfg.integrate_steps > 0 the head output is a stationary
    velocity field integrated by scaling and squaring (diffeomorphic); else it is the displacement (paper).
    Output arity is fixed (always a pair), so the model exports the same way in every configuration.
    """

    def __init__(self, cfg: NetConfig) -> None:
        if cfg.kind != "reg":
            raise ValueError(f"RegNet needs a config of kind 'reg', got {cfg.kind!r}")
        super().__init__()
        self.cfg = cfg
        self.backbone = UNet(cfg, 2 * cfg.in_channels)
        self.head = _head(cfg.ndim, self.backbone.out_channels, cfg.head_channels, cfg.ndim, 3)
        last = self.head[-1]
        nn.init.normal_(last.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(last.bias)

    def head_flow(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The flow head's raw output (B, ndim, *S): the displacement, or the velocity when integrate_steps > 0.

        Exported alone for backends without a 3D GridSample (TensorRT), which integrate and warp at run time.
        """
        self.check_input("moving", moving, self.cfg.in_channels)
        self.check_input("fixed", fixed, self.cfg.in_channels)
        if moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(moving.shape)} and "
                             f"{tuple(fixed.shape)}")
        h, _ = self.backbone(torch.cat([moving, fixed], dim=1))
        return self.head(h)

    def displacement(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) x2 -> displacement (B, ndim, *S) in voxels, channel i along spatial axis i."""
        flow = self.head_flow(moving, fixed)
        if self.cfg.integrate_steps > 0:
            flow = integrate(flow, steps=self.cfg.integrate_steps, padding=self.cfg.padding)
        return flow

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flow = self.displacement(moving, fixed)
        return warp(moving, flow, mode="linear", padding=self.cfg.padding), flow


def build_model(cfg: NetConfig) -> nn.Module:
    """The model class for cfg.kind, freshly initialized."""
    return {"seg": SegNet, "ae": AutoEncoder, "reg": RegNet}[cfg.kind](cfg)
