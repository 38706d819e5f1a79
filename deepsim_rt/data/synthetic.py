"""Synthetic subjects: the MNI152 atlas under random smooth diffeomorphisms and intensity changes, with known truth.

Subject i of a split is a pure function of (config, split, i): every random number comes from a CPU
`torch.Generator` seeded by `subject_seed(config.seed, split, i)`, drawn in a fixed order, so subject i is the same
on every call, in every DataLoader worker and (up to floating-point library differences) on every machine.

Deformation (all in voxel units of the configured grid):
  velocity v: Gaussian noise on a coarse grid (one node every `control_spacing` voxels), smoothed with a Gaussian of
      `smoothing_sigma` coarse nodes, upsampled (bi/trilinear, align_corners=True) to the image grid and scaled so
      max_p |v(p)| = max_displacement * s, s ~ U(min_displacement_fraction, 1);
  displacement u = integrate(v, steps) (scaling and squaring, deepsim_rt.kernels.integrate), phi(p) = p + u(p);
  subject(p) = atlas(phi(p)) = warp(atlas, u), labels with mode="nearest".
Intensity changes, in this order, on the warped image x in [0, 1]:
  gamma x^g, log g ~ N(0, gamma_std); contrast about the brain mean m: m + a (x - m) inside the warped brain mask,
  a ~ U(1 - contrast, 1 + contrast); smooth multiplicative bias field exp(b), b smooth noise with std ~ bias_std;
  Gaussian blur with sigma ~ U(0, blur_max) voxels; division by the maximum when it exceeds 1 (no saturation);
  additive Gaussian noise with std ~ U(0, noise_std); clamp to [0, 1].
Pairs: with phi_m = exp(v_m), phi_f = exp(v_f) and fixed = atlas o phi_f, moving = atlas o phi_m,
  fixed = moving o phi_m^-1 o phi_f, so the true displacement registering moving onto fixed
  (warp(moving, u) ~ fixed) is u(p) = u_f(p) + w_m(p + u_f(p)), w_m = integrate(-v_m) the displacement of
  phi_m^-1 = exp(-v_m).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepsim_rt.data.atlas import LABEL_NAMES, Atlas, load_atlas
from deepsim_rt.kernels import integrate, warp

__all__ = [
    "SyntheticConfig",
    "Subject",
    "SyntheticSubjects",
    "SyntheticPairs",
    "SPLITS",
    "PRESETS",
    "subject_seed",
    "label_names",
    "num_classes",
    "evaluation_pairs",
    "random_velocity",
    "gaussian_blur",
]

SPLITS = ("train", "val", "test")
# Distinct stream ids per split (and for the pair draws) so the splits never share a random stream.
_SPLIT_CODE = {"train": 101, "val": 202, "test": 303}
_PAIR_STREAM = 7_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic data set definition. Displacements, spacings and sigmas are in voxels of the configured grid.

    ndim: 2 (axial slice of the atlas) or 3 (volume). voxel_size: 1, 2 or 4 mm (atlas resolution).
    slice_index: 2D only, atlas slice (None: the default slice through the ventricles / basal ganglia).
    """

    ndim: int = 2
    voxel_size: int = 2
    slice_index: int | None = None
    max_displacement: float = 4.0
    min_displacement_fraction: float = 0.5
    control_spacing: int = 8
    smoothing_sigma: float = 1.0
    integration_steps: int = 7
    n_train: int = 256
    n_val: int = 32
    n_test: int = 32
    n_test_pairs: int = 64
    seed: int = 0
    gamma_std: float = 0.15
    contrast: float = 0.15
    bias_std: float = 0.15
    bias_spacing: int = 16
    blur_max: float = 0.6
    noise_std: float = 0.03

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3) or isinstance(self.ndim, bool):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if self.voxel_size not in (1, 2, 4) or isinstance(self.voxel_size, bool):
            raise ValueError(f"voxel_size must be 1, 2 or 4 (mm), got {self.voxel_size!r}")
        if self.ndim == 3 and self.slice_index is not None:
            raise ValueError(f"slice_index is for ndim=2 only, got {self.slice_index!r} with ndim=3")
        for name in ("n_train", "n_val", "n_test", "control_spacing", "bias_spacing"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        max_pairs = self.n_test * (self.n_test - 1)
        if not isinstance(self.n_test_pairs, int) or not 1 <= self.n_test_pairs <= max_pairs:
            raise ValueError(f"n_test_pairs must be an int in [1, n_test*(n_test-1) = {max_pairs}], got "
                             f"{self.n_test_pairs!r}")
        if not isinstance(self.integration_steps, int) or self.integration_steps < 0:
            raise ValueError(f"integration_steps must be an int >= 0, got {self.integration_steps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not self.max_displacement >= 0:
            raise ValueError(f"max_displacement must be >= 0 voxels, got {self.max_displacement!r}")
        if not 0.0 <= self.min_displacement_fraction <= 1.0:
            raise ValueError(f"min_displacement_fraction must be in [0, 1], got {self.min_displacement_fraction!r}")
        for name in ("smoothing_sigma", "gamma_std", "bias_std", "blur_max", "noise_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.contrast < 1.0:
            raise ValueError(f"contrast must be in [0, 1), got {self.contrast!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> SyntheticConfig:
        """A named configuration: "tiny-2d", "tiny-3d" (tests: small, fast), "default-2d", "default-3d" (2 mm;
        also as "default-3d-2mm"), "default-3d-4mm" (see PRESETS)."""
        if name not in PRESETS:
            raise ValueError(f"unknown SyntheticConfig preset {name!r}; choose one of {tuple(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SyntheticConfig fields {sorted(unknown)}")
        return cls(**d)

    def split_size(self, split: str) -> int:
        _check_split(split)
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


_DEFAULT_3D_2MM = SyntheticConfig(ndim=3, voxel_size=2, max_displacement=8.0, control_spacing=12, bias_spacing=24,
                                  n_train=64, n_val=8, n_test=16, n_test_pairs=32)
PRESETS: dict[str, SyntheticConfig] = {
    # 48 x 40 slice at 4 mm; a handful of subjects: for unit tests.
    "tiny-2d": SyntheticConfig(ndim=2, voxel_size=4, max_displacement=2.0, control_spacing=6, bias_spacing=12,
                               n_train=8, n_val=2, n_test=4, n_test_pairs=4),
    # 96 x 80 slice at 2 mm: what 2D training and the demo use (2 CPU cores).
    "default-2d": SyntheticConfig(ndim=2, voxel_size=2, max_displacement=4.0, control_spacing=8, bias_spacing=16,
                                  n_train=256, n_val=32, n_test=32, n_test_pairs=64),
    # 80 x 96 x 80 volume at 2 mm: the 3D default (training, demo). The same deformations and bias fields IN MM as
    # default-3d-4mm (displacement, control and bias spacings doubled in voxels; smoothing_sigma is in coarse nodes,
    # so unchanged). blur_max and noise stay per voxel: they model the acquisition at this resolution.
    "default-3d": _DEFAULT_3D_2MM,
    "default-3d-2mm": _DEFAULT_3D_2MM,  # the same preset under its explicit name (the 2 mm weights were trained as it)
    # 40 x 48 x 40 volume at 4 mm: the 3D default before the 2 mm one (8x fewer voxels).
    "default-3d-4mm": SyntheticConfig(ndim=3, voxel_size=4, max_displacement=4.0, control_spacing=6,
                                      bias_spacing=12, n_train=64, n_val=8, n_test=16, n_test_pairs=32),
    # Same grid, few subjects: for unit tests.
    "tiny-3d": SyntheticConfig(ndim=3, voxel_size=4, max_displacement=2.0, control_spacing=8, bias_spacing=12,
                               n_train=4, n_val=2, n_test=3, n_test_pairs=2),
}


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def label_names(config: SyntheticConfig | None = None) -> tuple[str, ...]:
    """Names of the label values of the synthetic subjects (the atlas labels; same for every config)."""
    return LABEL_NAMES


def num_classes(config: SyntheticConfig | None = None) -> int:
    """Number of label values, background included."""
    return len(LABEL_NAMES)


def subject_seed(seed: int, split: str, index: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, split, index[, stream]), mixed by numpy's SeedSequence (stable across platforms)."""
    words = np.random.SeedSequence([int(seed), _SPLIT_CODE[_check_split(split)], int(index), int(stream)])
    hi, lo = (int(w) for w in words.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *spatial) (2D or 3D), sigma in voxels, replicate padding. sigma 0 -> x."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(float(sigma)).to(x.dtype)
    r = (k.numel() - 1) // 2
    nsp = x.dim() - 2
    for axis in range(nsp):
        # Move `axis` last, run a 1D conv over it with every other dim folded into the batch.
        xt = x.movedim(2 + axis, -1)
        shape = xt.shape
        flat = xt.reshape(-1, 1, shape[-1])
        # Edge replication by hand: F.pad(mode="replicate") wants 3D+ input and the coarse grids can be 2 nodes.
        flat = torch.cat([flat[..., :1].expand(-1, -1, r), flat, flat[..., -1:].expand(-1, -1, r)], dim=-1)
        flat = F.conv1d(flat, k.view(1, 1, -1))
        x = flat.reshape(shape).movedim(-1, 2 + axis)
    return x


def _smooth_noise(shape: Sequence[int], channels: int, spacing: int, sigma: float, g: torch.Generator) -> torch.Tensor:
    """(1, channels, *shape) smooth random field: coarse N(0,1) noise, blurred, upsampled (align_corners=True)."""
    coarse = [max(2, math.ceil((s - 1) / spacing) + 1) for s in shape]
    noise = torch.randn((1, channels, *coarse), generator=g, dtype=torch.float32)
    noise = gaussian_blur(noise, sigma)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)


def random_velocity(shape: Sequence[int], config: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    """(1, ndim, *shape) smooth velocity with max |v| = max_displacement * U(min_fraction, 1) voxels."""
    v = _smooth_noise(shape, len(shape), config.control_spacing, config.smoothing_sigma, g)
    frac = config.min_displacement_fraction + (1.0 - config.min_displacement_fraction) * float(
        torch.rand((), generator=g)
    )
    peak = v.norm(dim=1).max().clamp_min(1e-12)
    return v * (config.max_displacement * frac / peak)


def _augment_intensity(x: torch.Tensor, mask: torch.Tensor, config: SyntheticConfig,
                       g: torch.Generator) -> torch.Tensor:
    """Intensity changes of a (1, 1, *S) image in [0, 1]; `mask` (1, 1, *S) bool marks brain voxels."""
    shape = x.shape[2:]
    # Draw every random number up front, in a fixed order, so a zero std never shifts the later streams.
    log_gamma = float(torch.randn((), generator=g)) * config.gamma_std
    a = 1.0 + config.contrast * (2.0 * float(torch.rand((), generator=g)) - 1.0)
    bias = _smooth_noise(shape, 1, config.bias_spacing, 1.0, g)
    blur = config.blur_max * float(torch.rand((), generator=g))
    noise_sd = config.noise_std * float(torch.rand((), generator=g))
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32)

    x = x.clamp(0.0, 1.0) ** math.exp(log_gamma)
    if bool(mask.any()):
        m = x[mask].mean()
        x = torch.where(mask, m + a * (x - m), x)
    bias = bias / bias.std().clamp_min(1e-12)
    x = x * torch.exp(config.bias_std * bias)
    x = gaussian_blur(x, blur)
    # Scale back under 1 rather than clip: the bias field lifts white matter (T1 ~0.84) past 1, and clipping here
    # saturated up to 43 % of the brain voxels of a 3D subject, erasing the GM/WM contrast the networks learn from.
    # (A no-op when nothing exceeds 1, e.g. with every intensity change switched off.)
    x = x / x.max().clamp_min(1.0)
    x = x + noise_sd * noise
    return x.clamp(0.0, 1.0)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject. image (1, *S) float32 in [0, 1]; labels (1, *S) int64; velocity, displacement
    (ndim, *S) float32 voxels, with image(p) = atlas(p + displacement(p)), displacement = integrate(velocity)."""

    image: torch.Tensor
    labels: torch.Tensor
    velocity: torch.Tensor
    displacement: torch.Tensor
    split: str
    index: int


class SyntheticSubjects(torch.utils.data.Dataset):
    """Subjects 0..n-1 of one split. Deterministic; generated on first access and cached (cache=True)."""

    def __init__(self, config: SyntheticConfig, split: str = "train", cache: bool = True,
                 atlas: Atlas | None = None) -> None:
        if not isinstance(config, SyntheticConfig):
            raise ValueError(f"config must be a SyntheticConfig, got {type(config).__name__}")
        self.config = config
        self.split = _check_split(split)
        self.atlas = atlas if atlas is not None else load_atlas(config.ndim, config.voxel_size, config.slice_index)
        if self.atlas.ndim != config.ndim:
            raise ValueError(f"atlas is {self.atlas.ndim}D but config.ndim is {config.ndim}")
        self._cache: dict[int, Subject] | None = {} if cache else None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.atlas.shape

    def __len__(self) -> int:
        return self.config.split_size(self.split)

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"subject index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"subject index {i} out of range for {n} {self.split} subjects")
        return int(i) % n

    def __getitem__(self, i) -> Subject:
        i = self._index(i)
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        s = self._make(i)
        if self._cache is not None:
            self._cache[i] = s
        return s

    def _make(self, i: int) -> Subject:
        cfg = self.config
        g = _generator(subject_seed(cfg.seed, self.split, i))
        v = random_velocity(self.shape, cfg, g)
        u = integrate(v, steps=cfg.integration_steps)
        labels = warp(self.atlas.labels, u, mode="nearest")
        image = warp(self.atlas.image, u, mode="linear")
        image = _augment_intensity(image, labels > 0, cfg, g)
        return Subject(image=image[0].contiguous(), labels=labels[0].contiguous(), velocity=v[0].contiguous(),
                       displacement=u[0].contiguous(), split=self.split, index=i)


def _all_pairs(n: int) -> list[tuple[int, int]]:
    return [(m, f) for m in range(n) for f in range(n) if m != f]


def _random_pairs(config: SyntheticConfig, split: str, n_pairs: int) -> list[tuple[int, int]]:
    allp = _all_pairs(config.split_size(split))
    if not 1 <= n_pairs <= len(allp):
        raise ValueError(f"n_pairs must be in [1, {len(allp)}] for {config.split_size(split)} {split} subjects, "
                         f"got {n_pairs}")
    g = _generator(subject_seed(config.seed, split, 0, stream=_PAIR_STREAM))
    order = torch.randperm(len(allp), generator=g)[:n_pairs].tolist()
    return [allp[k] for k in order]


def evaluation_pairs(config: SyntheticConfig) -> list[tuple[int, int]]:
    """The fixed, seeded list of `config.n_test_pairs` (moving, fixed) test-split pairs used for evaluation."""
    return _random_pairs(config, "test", config.n_test_pairs)


class SyntheticPairs(torch.utils.data.Dataset):
    """Registration pairs of one split with their true displacement.

    pairs: "all" (every ordered pair m != f), "random" (n_pairs seeded pairs without repeats; default n_pairs is
    n_test_pairs for the test split, which makes it `evaluation_pairs(config)`, else the split size), or a list of
    (moving, fixed) indices.
    Item: dict(moving, fixed (1, *S) float32; moving_labels, fixed_labels (1, *S) int64; true_displacement
    (ndim, *S) float32 voxels with warp(moving, true_displacement) ~ fixed).
    """

    def __init__(self, config: SyntheticConfig, split: str = "train", pairs: str | Sequence = "all",
                 n_pairs: int | None = None, cache: bool = True) -> None:
        self.subjects = SyntheticSubjects(config, split, cache=cache)
        self.config = config
        self.split = split
        n = len(self.subjects)
        if isinstance(pairs, str):
            if pairs == "all":
                if n_pairs is not None:
                    raise ValueError("n_pairs is for pairs='random' only")
                self.pairs = _all_pairs(n)
            elif pairs == "random":
                if n_pairs is None:
                    n_pairs = config.n_test_pairs if split == "test" else n
                self.pairs = _random_pairs(config, split, n_pairs)
            else:
                raise ValueError(f"pairs must be 'all', 'random' or a list of (moving, fixed), got {pairs!r}")
        else:
            out = []
            for k, p in enumerate(pairs):
                if len(p) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in p):
                    raise ValueError(f"pairs[{k}] must be (moving, fixed) ints, got {p!r}")
                if not all(0 <= x < n for x in p):
                    raise ValueError(f"pairs[{k}] = {tuple(p)} out of range for {n} {split} subjects")
                out.append((int(p[0]), int(p[1])))
            if not out:
                raise ValueError("pairs must not be empty")
            self.pairs = out
        if not self.pairs:
            raise ValueError(f"no pairs: the {split} split has {n} subject(s), need >= 2 for 'all'")

    def __len__(self) -> int:
        return len(self.pairs)

    def pair_indices(self, k: int) -> tuple[int, int]:
        return self.pairs[k]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        m, f = self.pairs[k]
        sm, sf = self.subjects[m], self.subjects[f]
        return {
            "moving": sm.image,
            "fixed": sf.image,
            "moving_labels": sm.labels,
            "fixed_labels": sf.labels,
            "true_displacement": true_displacement(sm, sf, self.config.integration_steps),
        }


def true_displacement(moving: Subject, fixed: Subject, steps: int) -> torch.Tensor:
    """(ndim, *S) u with warp(moving, u) ~ fixed: u(p) = u_f(p) + w_m(p + u_f(p)), w_m = integrate(-v_m)."""
    w_m = integrate(-moving.velocity[None], steps=steps)
    u_f = fixed.displacement[None]
    return (u_f + warp(w_m, u_f, mode="linear", padding="border"))[0]
