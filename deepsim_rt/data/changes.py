"""A seeded, fixed benchmark of TOPOLOGICAL change on the bundled synthetic data, with voxel-exact masks.

Case k of a benchmark is a registration pair (moving, fixed) in which the fixed subject carries one structural
change that no smooth deformation of the moving subject produces, and a boolean mask of the changed voxels on the
fixed grid. Everything is a pure function of (config, k): the change parameters come from a numpy Generator seeded
by `subject_seed(config.seed, split, k, stream=_CHANGE_STREAM)`, the subjects from `SyntheticSubjects`.

How a case is made (all geometry in the atlas's own grid, sizes given in mm and divided by the voxel size):
  1. f = k mod n (the split's subject count), m = (f + 1) mod n; kind = config.kinds[k mod len(kinds)].
  2. The atlas is altered on a region R (`insert_change`): the labels in R become the new tissue (keeping each
     voxel's hemisphere: left labels 1-3, right 4-6) and the image in R becomes that tissue's mean atlas intensity.
     R holds ONLY voxels whose label really changes, so the altered atlas differs from the atlas exactly on R.
       lesion     a ball of radius U(lesion_radius_mm) centred in GM or WM (at least radius + 2 voxels inside the
                  brain), filled with another tissue drawn from the two others (CSF: cyst-like, dark; GM in WM or
                  WM in GM: low contrast).
       gap        an added sulcus-like cleft of CSF: a straight segment of length U(gap_length_mm) and width
                  gap_width_mm from a brain-boundary voxel along the inward normal (gradient of the distance to
                  the background).
       ventricle  one lateral ventricle (the largest CSF component of a random hemisphere at least
                  ventricle_depth_mm inside the brain) grown by a ball of U(ventricle_grow_mm): CSF replaces the
                  surrounding tissue. The growth is a local volume change that the registration model's smooth,
                  regularized displacements (max 4 voxels by construction of the data) do not produce.
  3. fixed = subject f generated from the ALTERED atlas with f's own deformation and intensity draws
     (`SyntheticSubjects(cfg, split, atlas=altered)`); moving = subject m of the unaltered data.
  4. mask = R warped onto subject f with nearest neighbour (f's displacement) = exactly the voxels whose label in
     the changed fixed subject differs from the unchanged subject f (the tests check this equality). The image
     differs a little beyond the mask (linear interpolation, blur of the intensity model): the mask is the label
     change, voxel-exact by construction.
The ground truth is evaluated inside the fixed subject's brain (`ChangeCase.brain`: changed labels > 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from deepsim_rt.data.atlas import Atlas
from deepsim_rt.data.synthetic import SPLITS, SyntheticConfig, SyntheticSubjects, subject_seed
from deepsim_rt.kernels import warp

__all__ = ["CHANGE_KINDS", "ChangeBenchmarkConfig", "ChangeCase", "ChangeBenchmark", "insert_change"]

CHANGE_KINDS = ("lesion", "gap", "ventricle")
_CHANGE_STREAM = 9_000  # random stream id of the change draws (subject_seed's `stream`), apart from the subjects'
_TISSUES = ("csf", "gm", "wm")  # label value = 1 + 3 * side + tissue, side 0 left / 1 right (deepsim_rt.data.atlas)
_MIN_VOXELS = 4  # a 4 mm 3D gap is a 1-voxel line of 4-7 voxels, some of them CSF already
_MAX_DRAWS = 50  # a draw whose region comes out too small is redrawn (same generator): deterministic


def _h(text: str) -> dict:
    return {"help": text}


def _check_range(name: str, r) -> tuple[float, float]:
    if (not isinstance(r, tuple | list) or len(r) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in r) or not 0 < r[0] <= r[1]):
        raise ValueError(f"{name} must be a (low, high) pair of mm with 0 < low <= high, got {r!r}")
    return float(r[0]), float(r[1])


@dataclass(frozen=True)
class ChangeBenchmarkConfig:
    """The benchmark definition. data: a SyntheticConfig preset name (its subjects, grid and splits); split: which
    split's subjects (choose designs on "val", report "test"); n_cases: None = one case per subject of the split.
    Sizes in mm (converted with the atlas voxel size)."""

    data: str = "default-2d"
    split: str = "test"
    n_cases: int | None = None
    kinds: tuple[str, ...] = CHANGE_KINDS
    seed: int = 0
    lesion_radius_mm: tuple[float, float] = (6.0, 10.0)
    gap_width_mm: float = 4.0
    gap_length_mm: tuple[float, float] = (16.0, 28.0)
    ventricle_grow_mm: tuple[float, float] = (4.0, 8.0)
    ventricle_depth_mm: float = 12.0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.n_cases is not None and (isinstance(self.n_cases, bool) or not isinstance(self.n_cases, int)
                                         or self.n_cases < 1):
            raise ValueError(f"n_cases must be None or an int >= 1, got {self.n_cases!r}")
        kinds = tuple(self.kinds)
        if not kinds or any(k not in CHANGE_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty selection of {CHANGE_KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("lesion_radius_mm", "gap_length_mm", "ventricle_grow_mm"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))
        for name in ("gap_width_mm", "ventricle_depth_mm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a positive number of mm, got {v!r}")
        self.synthetic()  # an unknown preset fails here, at construction

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig.preset(self.data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChangeCase:
    """One benchmark case. moving, fixed: (1, *S) float32 in [0, 1]; moving_labels, fixed_labels: (1, *S) int64
    (fixed_labels are the CHANGED labels); mask: (1, *S) bool, the changed voxels on the fixed grid; brain: (1, *S)
    bool, fixed_labels > 0 (where AUCs are evaluated). params: the change's drawn parameters (JSON-able)."""

    index: int
    kind: str
    moving_index: int
    fixed_index: int
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    mask: torch.Tensor
    brain: torch.Tensor
    params: dict


# ----------------------------------------------------------------------------------------------------------------
# Changes in atlas space
# ----------------------------------------------------------------------------------------------------------------
def _tissue_means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean atlas intensity per tissue (csf, gm, wm), both hemispheres together."""
    tissue = (labels - 1) % 3
    return np.array([image[(labels > 0) & (tissue == t)].mean() for t in range(3)], dtype=np.float32)


def _distance_to(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Euclidean distance (voxels) of every grid point to the nearest True voxel of `points`."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~points) if points.any() else np.full(shape, np.inf)


def _grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=0)


def _choice(g: np.random.Generator, where: np.ndarray, what: str) -> np.ndarray:
    idx = np.argwhere(where)
    if len(idx) == 0:
        raise ValueError(f"no voxel qualifies for {what} on this atlas grid {where.shape}; use a finer grid")
    return idx[int(g.integers(len(idx)))].astype(np.float64)


def _draw_lesion(g, labels, dist_in, vox, cfg) -> tuple[np.ndarray, int, dict]:
    tissue = (labels - 1) % 3
    r = max(1.5, g.uniform(*cfg.lesion_radius_mm) / vox)
    c = _choice(g, (labels > 0) & (tissue > 0) & (dist_in >= r + 2), "a lesion centre")
    t_here = int(tissue[tuple(c.astype(int))])
    new = [t for t in range(3) if t != t_here][int(g.integers(2))]
    d = np.sqrt(((_grid(labels.shape) - c.reshape(-1, *([1] * labels.ndim))) ** 2).sum(0))
    return d <= r, new, {"centre": c.tolist(), "radius_vox": r, "tissue": _TISSUES[new]}


def _draw_gap(g, labels, dist_in, vox, cfg) -> tuple[np.ndarray, int, dict]:
    length = g.uniform(*cfg.gap_length_mm) / vox
    half_w = max(0.5, 0.5 * cfg.gap_width_mm / vox)
    start = _choice(g, (labels > 0) & (dist_in <= 1.5), "a gap start")
    # Inward normal: gradient of the (blurred) distance to the background at the start voxel.
    from scipy import ndimage

    grad = np.stack(np.gradient(ndimage.gaussian_filter(dist_in, 1.5)), axis=0)
    n = grad[(slice(None), *start.astype(int))]
    n = n / max(np.linalg.norm(n), 1e-12)
    rel = _grid(labels.shape) - start.reshape(-1, *([1] * labels.ndim))
    t = np.clip((rel * n.reshape(-1, *([1] * labels.ndim))).sum(0), 0.0, length)
    perp = np.sqrt(((rel - t * n.reshape(-1, *([1] * labels.ndim))) ** 2).sum(0))
    return perp <= half_w, 0, {"start": start.tolist(), "direction": n.tolist(), "length_vox": length,
                               "half_width_vox": half_w, "tissue": "csf"}


def _draw_ventricle(g, labels, dist_in, vox, cfg) -> tuple[np.ndarray, int, dict]:
    from scipy import ndimage

    side = int(g.integers(2))
    inner = (labels == 1 + 3 * side) & (dist_in > cfg.ventricle_depth_mm / vox)
    comp, n = ndimage.label(inner)
    if n == 0:
        raise ValueError(f"no CSF {cfg.ventricle_depth_mm} mm inside the brain on this atlas grid {labels.shape}: "
                         "no ventricle to grow")
    biggest = 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
    grow = g.uniform(*cfg.ventricle_grow_mm) / vox
    region = _distance_to(comp == biggest, labels.shape) <= grow
    return region, 0, {"side": ("left", "right")[side], "ventricle_voxels": int((comp == biggest).sum()),
                       "grow_vox": grow, "tissue": "csf"}


_DRAW = {"lesion": _draw_lesion, "gap": _draw_gap, "ventricle": _draw_ventricle}


def insert_change(atlas: Atlas, kind: str, g: np.random.Generator,
                  config: ChangeBenchmarkConfig | None = None) -> tuple[Atlas, np.ndarray, dict]:
    """Alter the atlas by one change of `kind` (see the module docstring) drawn from `g`.

    Returns (altered Atlas, region R as a bool array shaped like the atlas's spatial grid, params). The altered
    atlas equals `atlas` outside R, and inside R its labels differ from the original at EVERY voxel. A draw whose
    R holds fewer than 4 voxels is redrawn from the same generator (deterministic).
    """
    if kind not in CHANGE_KINDS:
        raise ValueError(f"kind must be one of {CHANGE_KINDS}, got {kind!r}")
    from scipy import ndimage

    cfg = config or ChangeBenchmarkConfig()
    labels = atlas.labels[0, 0].numpy()
    image = atlas.image[0, 0].numpy()
    vox = float(atlas.voxel_size)
    brain = labels > 0
    dist_in = ndimage.distance_transform_edt(brain)
    side = (labels - 1) // 3
    for _ in range(_MAX_DRAWS):
        shape_mask, tissue, params = _DRAW[kind](g, labels, dist_in, vox, cfg)
        new_labels = np.where(brain, 1 + 3 * side + tissue, 0)
        region = shape_mask & brain & (new_labels != labels)
        if region.sum() >= _MIN_VOXELS:
            break
    else:
        raise ValueError(f"could not place a {kind} change of at least 4 voxels in {_MAX_DRAWS} draws on the atlas "
                         f"grid {labels.shape}")
    out_labels = np.where(region, new_labels, labels)
    out_image = np.where(region, _tissue_means(image, labels)[tissue], image).astype(np.float32)
    params = {"kind": kind, "voxels": int(region.sum()), **params}
    altered = dataclasses.replace(atlas, image=torch.from_numpy(out_image)[None, None].contiguous(),
                                  labels=torch.from_numpy(out_labels.astype(np.int64))[None, None].contiguous())
    return altered, region, params


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
class ChangeBenchmark(torch.utils.data.Dataset):
    """Cases 0..n_cases-1 of a ChangeBenchmarkConfig (see the module docstring). Deterministic; cached."""

    def __init__(self, config: ChangeBenchmarkConfig, cache: bool = True) -> None:
        if not isinstance(config, ChangeBenchmarkConfig):
            raise ValueError(f"config must be a ChangeBenchmarkConfig, got {type(config).__name__}")
        self.config = config
        self.synthetic = config.synthetic()
        self.subjects = SyntheticSubjects(self.synthetic, config.split, cache=True)
        n = len(self.subjects)
        if n < 2:
            raise ValueError(f"the {config.split} split of {config.data!r} has {n} subject(s); a case needs 2")
        self._cache: dict[int, ChangeCase] | None = {} if cache else None

    def __len__(self) -> int:
        return self.config.n_cases if self.config.n_cases is not None else len(self.subjects)

    def __getitem__(self, k) -> ChangeCase:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"case index must be an int, got {type(k).__name__}")
        if not 0 <= k < len(self):
            raise IndexError(f"case {k} out of range for {len(self)} cases")
        k = int(k)
        if self._cache is not None and k in self._cache:
            return self._cache[k]
        case = self._make(k)
        if self._cache is not None:
            self._cache[k] = case
        return case

    def _make(self, k: int) -> ChangeCase:
        cfg = self.config
        n = len(self.subjects)
        f, m = k % n, (k % n + 1) % n
        kind = cfg.kinds[k % len(cfg.kinds)]
        g = np.random.default_rng(subject_seed(cfg.seed, cfg.split, k, stream=_CHANGE_STREAM))
        altered, region, params = insert_change(self.subjects.atlas, kind, g, cfg)
        fixed = SyntheticSubjects(self.synthetic, cfg.split, cache=False, atlas=altered)[f]
        region_t = torch.from_numpy(region.astype(np.int64))[None, None]
        mask = warp(region_t, fixed.displacement[None], mode="nearest")[0] > 0
        moving = self.subjects[m]
        return ChangeCase(index=k, kind=kind, moving_index=m, fixed_index=f, moving=moving.image,
                          fixed=fixed.image, moving_labels=moving.labels, fixed_labels=fixed.labels, mask=mask,
                          brain=fixed.labels > 0, params=params)
