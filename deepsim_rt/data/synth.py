"""Brains synthesized from label maps, any contrast (SynthMorph-style generative model; Hoffmann et al., TMI 2022).

A rendered subject is a pure function of (config, base label map, seed): every random number comes from one CPU
`torch.Generator`, drawn in a fixed order. Steps, on the grid of the label map (voxel units unless said):

1. Label map: the bundled MNI152 tissue map (2D: an axial slice within +-`slice_jitter_mm` of the default one),
   each tissue label split into `subdivisions` smooth random sub-regions, non-brain layers (extra-cerebral CSF,
   skull, scalp) drawn around the brain with probability `head_prob` (label_maps.py); or, in registration pairs
   with probability `shapes_prob`, a map of random smooth shapes (no anatomy).
2. Deformation phi = affine o non-linear, sampled as subject(p) = map(phi(p)):
   non-linear u_nl = integrate(v) (scaling and squaring), v smooth noise (one node every `control_mm`) scaled
   so max |v| = U(0.5, 1) * `nonlinear_mm`; affine about the grid centre c: phi(p) = c + M (p + u_nl(p) - c) + t,
   M = shear o rotation (+-`rotate_deg` per plane) o scaling (1 +- `scale`, per axis), |shear| <= `shear`,
   t ~ U(+-`shift_mm`) per axis. Labels are warped with nearest, so image and labels move together exactly.
3. Image from the warped generation labels: contrast template per subject ("t1": CSF < GM < WM, skull dark,
   scalp bright; "t2": inverted brain, CSF brightest; "random": every label U(0, 1); probabilities
   `contrast_probs`), a mean per label (template range + N(0, `label_jitter`)), within-label noise
   (sd U(0, `texture_sd`)), partial-volume blur (sigma U(`pv_blur`)), low resolution along one random axis
   (probability `lowres_prob`: blur + downsample by U(1, `max_thickness`) and linear upsample: thick slices),
   multiplicative bias exp(b), b smooth (one node every `bias_mm`), sd U(0, `bias_sd`); gamma x^exp(N(0,
   `gamma_sd`)); noise, Gaussian or Rician (probability `rician_prob`), sd U(0, `noise_sd`).
4. Robust normalization (`robust_normalize`): percentiles, not min-max, so a bright scalp or one outlier voxel does
   not squash the brain. Training uses exactly this function; the runtime applies min-max today (see report).

Registration pairs (`render_pair`): both images from one base anatomy (or one shape map), independent
non-linear deformations and independent contrasts, so a pair is usually cross-contrast. The affine part is split:
a fraction `pair_affine` of every affine range (rotation, scale, shear, shift) is drawn per image, the rest once
per pair as a shared subject-level affine S applied to both (phi_i = S o O_i o exp(v_i)). The shared part cancels
in the pair's relative affine O_a^-1 o O_b, so the net sees what it sees at deployment, where the pipeline affinely
pre-aligns first: a residual affine (default 0.2: +-2 deg, +-2 %, +-2 mm per image, up to twice that between the
two), as SynthMorph trains its deformable model on affinely aligned pairs. pair_affine = 1 is the first round's
behaviour (two independent full jitters, up to ~20 deg / 20 mm apart), bit for bit. `render_subject` (feature
extractor training) keeps the full jitter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepsim_rt.data import label_maps
from deepsim_rt.data.atlas import LABEL_NAMES, default_slice_index
from deepsim_rt.data.synthetic import gaussian_blur
from deepsim_rt.kernels import integrate, warp
from deepsim_rt.nn.intensity import percentile_normalize

__all__ = ["SynthConfig", "SYNTH_PRESETS", "Rendered", "robust_normalize", "render", "render_pair", "base_map",
           "random_deformation", "random_affine", "pair_shared_affine", "CONTRASTS", "synth_seed"]

CONTRASTS = ("t1", "t2", "random")
# Mean intensity range per class (label_maps.CLASS_NAMES: background, csf, gm, wm, skull, scalp) per template.
# T1 / T2 ranges follow the usual ordering of the tissues at 1.5-3 T (T1: CSF < GM < WM; T2: WM < GM < CSF), with
# wide ranges so no single ratio is learned.
_TEMPLATES = {
    "t1": ((0.0, 0.08), (0.08, 0.35), (0.38, 0.6), (0.65, 0.9), (0.0, 0.2), (0.55, 1.0)),
    "t2": ((0.0, 0.08), (0.75, 1.0), (0.45, 0.7), (0.2, 0.45), (0.0, 0.2), (0.3, 0.8)),
}
_HEAD_CLASSES = (1, 4, 5)  # extra-cerebral CSF, skull, scalp


@dataclass(frozen=True)
class SynthConfig:
    """Generative model settings. Millimetres for geometry (converted with `voxel_size`), voxels for blur."""

    ndim: int = 2
    voxel_size: int = 2
    slice_jitter_mm: float = 4.0
    rotate_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    shift_mm: float = 10.0
    # Fraction of the affine ranges drawn independently per image of a pair; the rest is one affine shared by both.
    # 0.2: the relative affine of a pair stays within a pre-alignment's residual (module docstring); 1.0: the first
    # round's independent jitters (recipes written before this field existed load as 1.0, see from_dict).
    pair_affine: float = 0.2
    nonlinear_mm: float = 8.0
    control_mm: float = 16.0
    integration_steps: int = 7
    subdivisions: int = 4
    subdivision_mm: float = 24.0
    head_prob: float = 0.8
    head_mm: tuple[float, float, float] = (2.0, 5.0, 5.0)
    shapes_prob: float = 0.25
    shape_labels: int = 7
    shape_mm: float = 24.0
    contrast_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    label_jitter: float = 0.04
    texture_sd: float = 0.04
    pv_blur: tuple[float, float] = (0.3, 1.0)
    lowres_prob: float = 0.3
    max_thickness: float = 3.0
    bias_sd: float = 0.3
    bias_mm: float = 48.0
    gamma_sd: float = 0.2
    noise_sd: float = 0.05
    rician_prob: float = 0.5
    n_train: int = 20000
    n_val: int = 16
    n_test: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3) or isinstance(self.ndim, bool):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if self.voxel_size not in (1, 2, 4) or isinstance(self.voxel_size, bool):
            raise ValueError(f"voxel_size must be 1, 2 or 4 (mm), got {self.voxel_size!r}")
        for name in ("head_prob", "shapes_prob", "lowres_prob", "rician_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        for name in ("rotate_deg", "scale", "shear", "shift_mm", "nonlinear_mm", "label_jitter", "texture_sd",
                     "bias_sd", "gamma_sd", "noise_sd", "slice_jitter_mm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.pair_affine <= 1.0:
            raise ValueError(f"pair_affine must be a fraction in [0, 1], got {self.pair_affine!r}")
        if not 0 <= self.scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {self.scale!r}")
        if len(self.contrast_probs) != 3 or abs(sum(self.contrast_probs) - 1.0) > 1e-6 \
                or min(self.contrast_probs) < 0:
            raise ValueError(f"contrast_probs must be 3 probabilities (t1, t2, random) summing to 1, got "
                             f"{self.contrast_probs!r}")
        if len(self.pv_blur) != 2 or not 0 <= self.pv_blur[0] <= self.pv_blur[1]:
            raise ValueError(f"pv_blur must be (lo, hi) voxels with 0 <= lo <= hi, got {self.pv_blur!r}")
        if self.max_thickness < 1:
            raise ValueError(f"max_thickness must be >= 1 (voxels), got {self.max_thickness!r}")
        for name in ("subdivisions", "n_train", "n_val", "n_test", "integration_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "integration_steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.shape_labels, bool) or not isinstance(self.shape_labels, int) \
                or not 2 <= self.shape_labels <= len(LABEL_NAMES):
            raise ValueError(f"shape_labels must be an int in [2, {len(LABEL_NAMES)}] (they are scored as tissue "
                             f"label values), got {self.shape_labels!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SynthConfig fields {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        # Recipes recorded before pair_affine existed were trained on independent affine jitters per image.
        d.setdefault("pair_affine", 1.0)
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> SynthConfig:
        if name not in SYNTH_PRESETS:
            raise ValueError(f"unknown synthesis preset {name!r}; choose one of {tuple(SYNTH_PRESETS)}")
        return dataclasses.replace(SYNTH_PRESETS[name], **overrides)


SYNTH_PRESETS: dict[str, SynthConfig] = {
    # 96 x 80 axial slices at 2 mm (the default-2d grid).
    "synth-2d": SynthConfig(),
    # The first round's pairs (two independent full affine jitters): how synth-2d/{seg,reg,reg_ncc,reg_mse} of
    # round 1 were trained.
    "synth-2d-independent": SynthConfig(pair_affine=1.0),
    # 80 x 96 x 80 at 2 mm (the default-3d grid); no slice jitter in 3D.
    "synth-3d": SynthConfig(ndim=3, slice_jitter_mm=0.0, n_val=4, n_test=8),
    # 48 x 40 slices at 4 mm, few subjects: unit tests.
    "synth-tiny-2d": SynthConfig(voxel_size=4, n_train=16, n_val=2, n_test=4),
}

_SPLIT_CODE = {"train": 11, "val": 22, "test": 33}


def synth_seed(seed: int, split: str, index: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, split, index, stream) (numpy SeedSequence: stable across platforms)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {tuple(_SPLIT_CODE)}, got {split!r}")
    w = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index), int(stream)]).generate_state(2, np.uint32)
    return ((int(w[0]) << 32) | int(w[1])) & ((1 << 63) - 1)


def robust_normalize(x: torch.Tensor, lo_pct: float = 0.5, hi_pct: float = 99.5) -> torch.Tensor:
    """Per image of (B, C, *S): (x - p_lo) / (p_hi - p_lo) clipped to [0, 1], percentiles over channels and voxels.

    With a head in the field of view, min-max lets the brightest 0.1 % (scalp fat, vessels, an outlier voxel) set
    the scale; the 99.5th percentile ignores them. A constant image becomes 0. The "percentile" intensity contract
    of the runtime and the serving graphs: one implementation (nn.intensity, equal to torch.quantile's linear
    interpolation bit for bit on brains; exportable), so training sees exactly what deployment feeds.
    """
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"need 0 <= lo_pct < hi_pct <= 100, got {lo_pct!r}, {hi_pct!r}")
    return percentile_normalize(x, (lo_pct, hi_pct))[0].to(x.dtype)


@dataclass(frozen=True)
class Rendered:
    """image (1, *S) float32 in [0, 1] (robust-normalized); labels (1, *S) int64 scoring labels (tissue 0..6, or
    shape labels); displacement (ndim, *S) float32 voxels with labels = warp(base labels, displacement, nearest);
    contrast: "t1" | "t2" | "random"; info: the scalar draws (mm, sds, ...), for tests and the recipe."""

    image: torch.Tensor
    labels: torch.Tensor
    displacement: torch.Tensor
    contrast: str
    info: dict


def _u(g: torch.Generator, lo: float = -1.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def base_map(cfg: SynthConfig, g: torch.Generator, shapes: bool = False,
             shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(gen labels, scoring labels, class per gen label) before deformation, both (1, 1, *S) int64.

    shapes=True: random smooth shapes (gen = scoring labels, every class 'random'); else the anatomy (2D slice
    jittered), subdivided, with a head with probability head_prob.
    """
    vs = cfg.voxel_size
    if shapes:
        if shape is None:
            shape = tuple(label_maps.anatomy(cfg.ndim, vs).shape[2:])
        lab = label_maps.random_shapes(shape, cfg.shape_labels, cfg.shape_mm / vs, g)
        return lab, lab, [-1] * cfg.shape_labels
    k = None
    if cfg.ndim == 2:
        jit = int(round(cfg.slice_jitter_mm / vs))
        k = default_slice_index(vs) + int(torch.randint(-jit, jit + 1, (), generator=g))
    tissue = label_maps.anatomy(cfg.ndim, vs, k)
    gen = label_maps.subdivide(tissue, cfg.subdivisions, cfg.subdivision_mm / vs, g)
    n_tissue = len(LABEL_NAMES) - 1
    classes = [0] + [label_maps.TISSUE_CLASS[1 + j // cfg.subdivisions] for j in range(n_tissue * cfg.subdivisions)]
    head = _u(g, 0, 1) < cfg.head_prob
    thick = [t / vs * _u(g, 0.6, 1.4) for t in cfg.head_mm]
    if head:
        gen = label_maps.add_head(gen, tissue > 0, len(classes), thick, g, cfg.subdivision_mm / vs)
    classes += list(_HEAD_CLASSES)
    return gen, tissue, classes


def random_affine(cfg: SynthConfig, nd: int, g: torch.Generator, fraction: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """An affine about the grid centre, x -> c + M (x - c) + t, with every range of cfg times `fraction`:
    M (nd, nd) float32, t (nd,) float32 voxels, and the draws (degrees, scales, shears, mm). The draws happen in
    the same order whatever `fraction`, so fraction 1 reproduces the unscaled stream."""
    vs = cfg.voxel_size
    planes = [(0, 1)] if nd == 2 else [(0, 1), (0, 2), (1, 2)]
    angles = [math.radians(cfg.rotate_deg) * fraction * _u(g) for _ in planes]
    scales = [1.0 + cfg.scale * fraction * _u(g) for _ in range(nd)]
    shears = [cfg.shear * fraction * _u(g) for _ in range(nd * (nd - 1))]
    shift = [cfg.shift_mm / vs * fraction * _u(g) for _ in range(nd)]
    m = torch.diag(torch.tensor(scales, dtype=torch.float64))
    for (i, j), a in zip(planes, angles, strict=True):
        r = torch.eye(nd, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        m = r @ m
    sh = torch.eye(nd, dtype=torch.float64)
    for (i, j), s in zip([(i, j) for i in range(nd) for j in range(nd) if i != j], shears, strict=True):
        sh[i, j] = s
    info = {"rotate_deg": [math.degrees(a) for a in angles], "scales": scales, "shears": shears,
            "shift_mm": [s * vs for s in shift]}
    return (sh @ m).float(), torch.tensor(shift, dtype=torch.float32), info


def random_deformation(cfg: SynthConfig, shape: tuple[int, ...], g: torch.Generator, affine_fraction: float = 1.0,
                       shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """(1, ndim, *shape) voxel displacement u of phi = S o O o exp(v) (module docstring), and the draws.

    O: this image's affine, ranges times `affine_fraction`; S: a shared affine (M_s, t_s) from `random_affine`
    (None: identity)."""
    nd, vs = len(shape), cfg.voxel_size
    v = label_maps.smooth_field(shape, nd, cfg.control_mm / vs, g)
    frac = _u(g, 0.5, 1.0)
    v = v * (cfg.nonlinear_mm / vs * frac / v.norm(dim=1).max().clamp_min(1e-12))
    u_nl = integrate(v, steps=cfg.integration_steps)
    m, t, info = random_affine(cfg, nd, g, affine_fraction)
    if shared is not None:  # S o O: M = M_s M, t = M_s t + t_s (both about the grid centre)
        m, t = shared[0] @ m, shared[0] @ t + shared[1]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    p = torch.stack(grids)[None]  # (1, nd, *S)
    c = torch.tensor([(s - 1) / 2.0 for s in shape]).view(1, nd, *([1] * nd))
    q = p + u_nl - c
    phi = torch.einsum("ij,bj...->bi...", m, q) + c + t.view(1, nd, *([1] * nd))
    info = {"nonlinear_max_mm": float(u_nl.norm(dim=1).max()) * vs, **info}
    return phi - p, info


def _contrast(cfg: SynthConfig, g: torch.Generator, shapes: bool) -> str:
    r = _u(g, 0, 1)
    if shapes:
        return "random"
    p_t1, p_t2, _ = cfg.contrast_probs
    return "t1" if r < p_t1 else ("t2" if r < p_t1 + p_t2 else "random")


def _lowres(x: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Thick slices along `axis`: Gaussian slab profile (FWHM = factor voxels), sample every `factor`, upsample."""
    if factor <= 1.0 + 1e-3:
        return x
    xt = x.movedim(2 + axis, -1)
    sh = xt.shape
    flat = gaussian_blur(xt.reshape(-1, 1, sh[-1]), factor / 2.355)
    n = max(2, int(round(sh[-1] / factor)))
    down = F.interpolate(flat, size=n, mode="linear", align_corners=True)
    up = F.interpolate(down, size=sh[-1], mode="linear", align_corners=True)
    return up.reshape(sh).movedim(-1, 2 + axis)


def render(cfg: SynthConfig, gen: torch.Tensor, scoring: torch.Tensor, classes: list[int], g: torch.Generator,
           contrast: str | None = None, affine_fraction: float = 1.0,
           shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> Rendered:
    """Deform a base label map and render an image from it (module docstring, steps 2-4). gen, scoring: (1, 1, *S)
    int64. contrast: force a template (None: drawn with contrast_probs). affine_fraction, shared: the pair's
    affine split (random_deformation)."""
    shape = tuple(gen.shape[2:])
    u, info = random_deformation(cfg, shape, g, affine_fraction, shared)
    shapes = classes[0] == -1
    drawn = _contrast(cfg, g, shapes)
    contrast = drawn if contrast is None else contrast
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    # Every draw below happens whatever the settings, in a fixed order, so a zero sd never shifts later streams.
    n_gen = len(classes)
    rand_means = torch.rand(n_gen, generator=g, dtype=torch.float64)
    jitter = torch.randn(n_gen, generator=g, dtype=torch.float64)
    tex_sd = torch.rand(n_gen, generator=g, dtype=torch.float64) * cfg.texture_sd
    tex = torch.randn((1, 1, *shape), generator=g)
    pv = _u(g, *cfg.pv_blur)
    lowres_on = _u(g, 0, 1) < cfg.lowres_prob
    lowres_axis = int(torch.randint(len(shape), (), generator=g))
    thickness = _u(g, 1.0, cfg.max_thickness)
    bias = label_maps.smooth_field(shape, 1, cfg.bias_mm / cfg.voxel_size, g)
    bias_sd = _u(g, 0, cfg.bias_sd)
    log_gamma = float(torch.randn((), generator=g)) * cfg.gamma_sd
    noise_sd = _u(g, 0, cfg.noise_sd)
    rician = _u(g, 0, 1) < cfg.rician_prob
    n1 = torch.randn((1, 1, *shape), generator=g)
    n2 = torch.randn((1, 1, *shape), generator=g)

    gen_w = warp(gen, u, mode="nearest", padding="zeros")
    lab_w = warp(scoring, u, mode="nearest", padding="zeros")
    if contrast == "random":
        means = rand_means
    else:
        lo = torch.tensor([_TEMPLATES[contrast][max(c, 0)][0] for c in classes], dtype=torch.float64)
        hi = torch.tensor([_TEMPLATES[contrast][max(c, 0)][1] for c in classes], dtype=torch.float64)
        # One mean per gen label within its class range; subdivisions of one class differ by label_jitter.
        means = (lo + (hi - lo) * rand_means + cfg.label_jitter * jitter).clamp(0.0, 1.0)
    x = means.float()[gen_w] + tex_sd.float()[gen_w] * tex
    x = gaussian_blur(x, pv)
    if lowres_on:
        x = _lowres(x, lowres_axis, thickness)
    x = x.clamp_min(0.0) * torch.exp(bias_sd * bias)
    x = x / x.max().clamp_min(1e-6)
    x = x ** math.exp(log_gamma)
    x = (x + noise_sd * n1).square().add((noise_sd * n2).square()).sqrt() if rician else x + noise_sd * n1
    image = robust_normalize(x)
    info.update({"contrast": contrast, "pv_blur": pv, "lowres_axis": lowres_axis if lowres_on else None,
                 "thickness": thickness if lowres_on else 1.0, "bias_sd": bias_sd, "gamma": math.exp(log_gamma),
                 "noise_sd": noise_sd, "rician": rician})
    return Rendered(image=image[0].contiguous(), labels=lab_w[0].contiguous(), displacement=u[0].contiguous(),
                    contrast=contrast, info=info)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def render_subject(cfg: SynthConfig, split: str, index: int) -> Rendered:
    """Subject `index` of `split`: anatomy (never shapes), its own slice, deformation (the full affine jitter,
    whatever pair_affine) and contrast."""
    return _subject(cfg, split, index)


def _subject(cfg: SynthConfig, split: str, index: int, affine_fraction: float = 1.0,
             shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> Rendered:
    g = _gen(synth_seed(cfg.seed, split, index))
    gen, scoring, classes = base_map(cfg, g)
    return render(cfg, gen, scoring, classes, g, affine_fraction=affine_fraction, shared=shared)


def pair_shared_affine(cfg: SynthConfig, split: str, moving: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine S shared by both images of the pair whose moving subject is `moving` (ranges times
    1 - pair_affine; own stream 4), or None when pair_affine = 1 (independent jitters, the first round's pairs)."""
    if cfg.pair_affine >= 1.0:
        return None
    m, t, _ = random_affine(cfg, cfg.ndim, _gen(synth_seed(cfg.seed, split, moving, stream=4)), 1.0 - cfg.pair_affine)
    return m, t


def render_pair(cfg: SynthConfig, split: str, moving: int, fixed: int) -> tuple[Rendered, Rendered]:
    """A registration pair: moving = subject `moving`; fixed = subject `fixed` rendered from the SAME base map when
    the pair is a shape pair (probability shapes_prob, train split only), else from its own anatomy draw (another
    slice in 2D: inter-subject anatomy). Each image's affine: its own (ranges x pair_affine) after the pair's
    shared one (pair_shared_affine); with pair_affine = 1, each is subject `index` exactly as render_subject."""
    gp = _gen(synth_seed(cfg.seed, split, moving, stream=1))
    shapes = split == "train" and _u(gp, 0, 1) < cfg.shapes_prob
    shared, frac = pair_shared_affine(cfg, split, moving), cfg.pair_affine
    if not shapes:
        return _subject(cfg, split, moving, frac, shared), _subject(cfg, split, fixed, frac, shared)
    gen, scoring, classes = base_map(cfg, gp, shapes=True)
    gm, gf = _gen(synth_seed(cfg.seed, split, moving, 2)), _gen(synth_seed(cfg.seed, split, fixed, 3))
    return (render(cfg, gen, scoring, classes, gm, affine_fraction=frac, shared=shared),
            render(cfg, gen, scoring, classes, gf, affine_fraction=frac, shared=shared))
