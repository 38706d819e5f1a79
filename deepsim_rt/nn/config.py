"""Dataclass configs for every network, with named presets (one source of truth for API, CLI and checkpoints).

A config is stored beside the weights (safetensors metadata), so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

KINDS = ("seg", "ae", "reg")
# The input intensity contracts (nn.intensity): "minmax" = per-sample min and max to [0, 1] (the bundled defaults);
# "percentile" = per-sample 0.5 / 99.5 % percentiles to [0, 1], clipped (synthesis training, data.synth).
INTENSITIES = ("minmax", "percentile")

# Channel widths per preset and dimensionality: (encoder stages, decoder stages, head width).
# "paper": PAPER_NOTES (encoder 64/128/256 in 2D, 32/64/128 in 3D; the decoder mirrors the encoder).
# "small": what the bundled weights use, trainable on 2 CPU cores in minutes. In 3D it is 16/32/64, not 8/16/32:
# ATen sends 8-channel 3x3x3 convolutions at batch 1 to its slow im2col path (slow_conv3d) instead of oneDNN
# (benchmarks/RESULTS.md), so the narrower net was both weaker and not faster. "tiny": unit tests.
_WIDTHS = {
    ("paper", 2): ((64, 128, 256), (256, 128, 64), 64),
    ("paper", 3): ((32, 64, 128), (128, 64, 32), 32),
    ("small", 2): ((16, 32, 64), (64, 32, 16), 16),
    ("small", 3): ((16, 32, 64), (64, 32, 16), 16),
    ("tiny", 2): ((4, 8, 8), (8, 8, 4), 4),
    ("tiny", 3): ((4, 4, 8), (8, 4, 4), 4),
}


@dataclass(frozen=True)
class NetConfig:
    """Configuration of a U-Net based model (segmentation, autoencoder or registration).

    kind: "seg" (skips on, n_classes logits), "ae" (skips OFF, image reconstruction through a sigmoid),
        "reg" (input = concat(moving, fixed), output = displacement in voxel units).
    ndim: 2 or 3 spatial dims.  in_channels: image channels (reg: channels of ONE image; the net sees 2x).
    out_channels: seg -> n_classes, ae -> in_channels, reg -> ndim (set automatically by `make`).
    enc_channels: one entry per encoder stage; stage l runs at 1/2**l resolution. Spatial sizes fed to the
        network must be multiples of 2**len(enc_channels) (see `spatial_multiple`); the runtime pads.
    dec_channels: one entry per decoder stage (same length as enc_channels).
    dropout: channel dropout after each stage, training only (paper: 0.5 for feature extractors).
    integrate_steps: reg only; 0 = the paper's plain displacement, > 0 = scaling-and-squaring of a velocity.
    padding: reg only; warp padding "border" (DeepSim code) or "zeros" (VoxelMorph).
    intensity: the input contract, one of INTENSITIES (nn.intensity does both): "minmax" = each image scaled to
        [0, 1] by its own min and max; "percentile" = (x - p0.5) / (p99.5 - p0.5) clipped to [0, 1], the percentiles
        per sample over channels and voxels (torch.quantile "linear"), so a bright scalp or one outlier voxel does
        not squash the brain. Old checkpoints say "minmax" and load unchanged.
    """

    kind: str
    ndim: int
    in_channels: int = 1
    out_channels: int = 1
    enc_channels: tuple[int, ...] = (16, 32, 64)
    dec_channels: tuple[int, ...] = (64, 32, 16)
    head_channels: int = 16
    dropout: float = 0.0
    integrate_steps: int = 0
    padding: str = "border"
    intensity: str = "minmax"
    label_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if len(self.enc_channels) == 0 or len(self.enc_channels) != len(self.dec_channels):
            raise ValueError(f"enc_channels and dec_channels must be non-empty and of equal length, got "
                             f"{self.enc_channels} and {self.dec_channels}")
        if any(int(c) <= 0 for c in (*self.enc_channels, *self.dec_channels, self.head_channels)):
            raise ValueError("channel counts must be positive")
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError(f"in/out channels must be positive, got {self.in_channels}/{self.out_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.integrate_steps < 0:
            raise ValueError(f"integrate_steps must be >= 0, got {self.integrate_steps}")
        if self.padding not in ("border", "zeros"):
            raise ValueError(f"padding must be 'border' or 'zeros', got {self.padding!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        if self.kind == "reg" and self.out_channels != self.ndim:
            raise ValueError(f"a registration net outputs ndim={self.ndim} channels, got out_channels="
                             f"{self.out_channels}")
        if self.kind == "ae" and self.out_channels != self.in_channels:
            raise ValueError(f"an autoencoder reconstructs its input: out_channels ({self.out_channels}) must equal "
                             f"in_channels ({self.in_channels})")

    @property
    def spatial_multiple(self) -> int:
        """Every spatial size fed to the network must be a multiple of this (2**number of encoder stages)."""
        return 2 ** len(self.enc_channels)

    @property
    def skips(self) -> bool:
        """The autoencoder has no skip connections (it must encode everything in the bottleneck)."""
        return self.kind != "ae"

    @classmethod
    def make(cls, kind: str, ndim: int, preset: str = "small", *, n_classes: int | None = None,
             in_channels: int = 1, **overrides) -> NetConfig:
        """Build a config from a named preset: preset in {"paper", "small", "tiny"}.

        seg needs n_classes. Feature extractors (seg, ae) get dropout 0.5 as in the paper; reg gets none.
        """
        if (preset, ndim) not in _WIDTHS:
            names = sorted({p for p, _ in _WIDTHS})
            raise ValueError(f"unknown preset {preset!r} for ndim={ndim}; expected one of {names} and ndim 2 or 3")
        enc, dec, head = _WIDTHS[(preset, ndim)]
        if kind == "seg":
            if n_classes is None or n_classes < 2:
                raise ValueError(f"a segmentation config needs n_classes >= 2, got {n_classes!r}")
            out = n_classes
        elif kind == "ae":
            out = in_channels
        elif kind == "reg":
            out = ndim
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        params = dict(kind=kind, ndim=ndim, in_channels=in_channels, out_channels=out, enc_channels=enc,
                      dec_channels=dec, head_channels=head, dropout=0.5 if kind in ("seg", "ae") else 0.0)
        params.update(overrides)
        return cls(**params)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"model config has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        for key in ("enc_channels", "dec_channels", "label_names"):
            if key in data:
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"model config is incomplete: {exc}") from exc
