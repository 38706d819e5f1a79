"""The world-space steps around a registration of images with affines (NIfTI), for
`deepsim-rt register` (pipeline.register).

    prep = prepare_pair(moving, moving_affine, fixed, fixed_affine, affine="affine"|"affine-nmi"|...)
    res = registrator.register(prep.moving_on_fixed, fixed, spacing=prep.fixed.spacing, ...)
    out = prep.finish(res.displacement, moving, labels, label_mode, padding)   # when prep.resampled

1. Grids: moving goes onto the fixed grid through the two affines (linear, zeros outside its field of view) when
   the grids differ, or through the pre-alignment W (fixed world -> moving world) with `affine`.
2. The network registers that image to fixed (the runtime handles the model's spacing).
3. finish(): the network's displacement is composed with W into one fixed-voxel displacement u (voxel form, see
   transforms.itk), and the ORIGINAL moving image and labels are sampled once at A_m^-1 A_f (p + u(p)): no
   double interpolation, and `transform_itk.nii.gz` reproduces warped.nii.gz in ANTs / ITK.
`facts` is the JSON-ready record of what was done (for summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from deepsim_rt.transforms.compose import compose_world, source_coords
from deepsim_rt.transforms.grid import Grid, same_grid
from deepsim_rt.transforms.resample import resample_to_grid, sample, sample_labels

__all__ = ["PreparedPair", "prepare_pair", "register_world", "register_world_parts", "WorldResult"]


@dataclass
class PreparedPair:
    """Grids of a pair and the moving image as the network sees it (on the fixed grid)."""

    moving: Grid
    fixed: Grid
    moving_on_fixed: np.ndarray  # (*fixed.shape) float32
    world: np.ndarray | None     # fixed world -> moving world (mm), None: identity
    facts: dict = field(default_factory=dict)

    @property
    def resampled(self) -> bool:
        """True when moving was resampled (other grid or a pre-alignment): finish() must produce the outputs."""
        return self.world is not None or not same_grid(self.moving, self.fixed)

    def compose(self, u_net: np.ndarray) -> np.ndarray:
        """Network displacement (nd, *S) -> composed fixed-voxel displacement (nd, *S) (transforms.compose)."""
        u = torch.from_numpy(np.ascontiguousarray(u_net, dtype=np.float32))[None]
        return compose_world(u, self.fixed, self.world)[0].numpy().astype(np.float32)

    def finish(self, u: np.ndarray, moving: np.ndarray, labels: np.ndarray | None, label_mode: str,
               padding: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample the original moving image (linear) and labels (label_mode) once through the composed
        displacement u (nd, *S) (from `compose`); returns (warped float32, warped labels in their dtype)."""
        q = source_coords(torch.from_numpy(u)[None], self.fixed, self.moving)
        warped = sample(torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None], q, "linear",
                        padding)[0, 0].numpy()
        wl = None
        if labels is not None:
            lab = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))[None, None]
            wl = sample_labels(lab, q, label_mode, padding)[0, 0].numpy().astype(labels.dtype)
        return warped, wl


def prepare_pair(moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray, fixed_affine: np.ndarray,
                 affine: str | None = None, names: tuple[str, str] = ("moving", "fixed")) -> PreparedPair:
    """Grids of moving (*S_m) and fixed (*S_f) from their NIfTI affines (degenerate affines: ValueError), the
    optional pre-alignment ("rigid" | "affine", "-nmi" for mutual information: transforms.affine.parse_affine), and
    moving resampled onto the fixed grid."""
    nd = fixed.ndim
    mg = Grid.of(moving.shape, moving_affine, names[0])
    fg = Grid.of(fixed.shape, fixed_affine, names[1])
    if mg.ndim != fg.ndim:
        raise ValueError(f"moving is {mg.ndim}D and fixed is {fg.ndim}D; give two {nd}D images")
    facts: dict = {"moving_grid": mg.as_dict(), "fixed_grid": fg.as_dict(), "affine": None}
    world = None
    if affine is not None:
        from deepsim_rt.transforms.affine import affine_align, parse_affine

        kind, metric = parse_affine(affine)
        world, facts["affine"] = affine_align(torch.from_numpy(np.asarray(moving, np.float32)), mg,
                                              torch.from_numpy(np.asarray(fixed, np.float32)), fg, kind=kind,
                                              metric=metric)
    prep = PreparedPair(mg, fg, np.asarray(moving, dtype=np.float32), world, facts)
    facts["moving_resampled_to_fixed_grid"] = prep.resampled
    if prep.resampled:
        img = torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None]
        prep.moving_on_fixed = resample_to_grid(img, mg, fg, "linear", "zeros", world=world)[0, 0].numpy()
    return prep


def register_world(register, moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray,
                   fixed_affine: np.ndarray, labels: np.ndarray | None = None, affine: str | None = None,
                   label_mode: str = "nearest", names: tuple[str, str] = ("moving", "fixed")):
    """`register_world_parts` as a 4-tuple (warped, u, warped labels or None, facts), without the parts."""
    return tuple(register_world_parts(register, moving, moving_affine, fixed, fixed_affine, labels, affine,
                                      label_mode, names))[:4]


def register_world_parts(register, moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray,
                         fixed_affine: np.ndarray, labels: np.ndarray | None = None, affine: str | None = None,
                         label_mode: str = "nearest", names: tuple[str, str] = ("moving", "fixed"),
                         fixed_mask: tuple[np.ndarray, np.ndarray] | None = None,
                         moving_mask: tuple[np.ndarray, np.ndarray] | None = None) -> WorldResult:
    """The whole world-space registration of a NIfTI pair (module docstring).

    register(moving_on_fixed, fixed, labels_or_None, spacing_mm) -> a runtime RegistrationResult (numpy form),
    e.g. a Registrator.register call. Returns a WorldResult: warped (*S_f) float32, u (nd, *S_f) composed
    fixed-voxel displacement, warped labels or None, facts (grids, pre-alignment, what the network ran at), and the
    two parts of u: `world` (the pre-alignment, fixed world -> moving world, or None) and `u_net` (nd, *S_f), the
    deformable part on the fixed grid in fixed voxels (the point of fixed voxel p is A_f (p + u_net(p)), then
    `world` maps it into moving space).

    fixed_mask / moving_mask: (array, affine) on any grid, non-zero = inside (a brain mask). Each image is first
    multiplied by its own mask (on its own grid), so the pre-alignment and the network see brains, as the models
    were trained (Colin27's head with skull -> the CAT12 brain, `--affine affine`, default-3d: 12-structure Dice
    0.292 unmasked, 0.620 masked = Colin27's brain file's own 0.620); the outputs still sample the ORIGINAL
    image. Both masks then go onto the fixed grid (the moving one through the pre-alignment as well; linear,
    inside where > 1/2) and their union is given to `register` as mask= (the refinement's similarity counts those
    voxels only); WorldResult.mask holds it."""
    strip = {}
    for role, part, img, img_aff in (("moving", moving_mask, moving, moving_affine),
                                     ("fixed", fixed_mask, fixed, fixed_affine)):
        if part is not None:
            arr, aff = part
            own = Grid.of(img.shape, img_aff, role)
            inside = torch.from_numpy(np.ascontiguousarray(arr != 0, dtype=np.float32))[None, None]
            on_own = resample_to_grid(inside, Grid.of(arr.shape, aff, f"{role} mask"), own, "linear", "zeros")
            strip[role] = np.asarray(img, np.float32) * (on_own[0, 0].numpy() > 0.5)
    prep = prepare_pair(strip.get("moving", moving), moving_affine, strip.get("fixed", fixed), fixed_affine, affine,
                        names)
    fixed = strip.get("fixed", fixed)
    mask = None
    for part, world, what in ((fixed_mask, None, "fixed mask"), (moving_mask, prep.world, "moving mask")):
        if part is not None:
            arr, aff = part
            src = Grid.of(arr.shape, aff, what)
            img = torch.from_numpy(np.ascontiguousarray(arr != 0, dtype=np.float32))[None, None]
            on_fixed = resample_to_grid(img, src, prep.fixed, "linear", "zeros", world=world)[0, 0].numpy() > 0.5
            mask = on_fixed if mask is None else mask | on_fixed
    if mask is not None and not mask.any():
        raise ValueError("the masks cover no voxel of the fixed image (on the fixed grid, after the pre-alignment): "
                         "check that they belong to these images")
    extra = {} if mask is None else {"mask": mask}
    # a stripped moving image: the outputs are sampled from the original one (finish), never from what the net saw
    resample_outputs = prep.resampled or "moving" in strip
    res = register(prep.moving_on_fixed, fixed, None if resample_outputs else labels, prep.fixed.spacing, **extra)
    u = prep.compose(res.displacement)
    if resample_outputs:
        warped, warped_labels = prep.finish(u, moving, labels, label_mode, "zeros")
    else:
        warped, warped_labels = res.warped, res.warped_labels
    u_net = np.asarray(res.displacement, dtype=np.float32)
    return WorldResult(warped, u, warped_labels, {**prep.facts, "network": res.scale}, prep.world, u_net, mask)


class WorldResult(NamedTuple):
    """What `register_world` returns (see there)."""

    warped: np.ndarray
    u: np.ndarray
    warped_labels: np.ndarray | None
    facts: dict
    world: np.ndarray | None
    u_net: np.ndarray
    mask: np.ndarray | None = None  # (*S_f) bool: the masks' union on the fixed grid, None without masks
