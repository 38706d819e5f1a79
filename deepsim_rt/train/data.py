"""Data for training and evaluation: data sources, intensity normalization, seeded sampling and augmentation.

A data source is a synthetic preset name (SYNTHETIC_PRESETS; deepsim_rt.data) or a
NIfTI folder (see `open_source`). Every image fed to a network is min-max normalized to [0, 1] (the models'
`intensity="minmax"` contract, which the runtime applies too), except the synthesis presets' (deepsim_rt.data.synth),
which are robust-normalized (percentiles): their DataSource says intensity="percentile" and the trained models
record it (NetConfig.intensity), so the runtime feeds them the same way.

Sampling is a pure function of (seed, epoch, position): the epoch order comes from torch's DistributedSampler
(seeded by seed + epoch), and each item's random choices (augmentation, fixed partner of a pair) from a generator
seeded by (seed, epoch, item index). A resumed or distributed run therefore sees exactly the items and
augmentations of an uninterrupted single-process run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

__all__ = [
    "DataSource",
    "open_source",
    "minmax",
    "item_generator",
    "random_affine_flip",
    "EpochBatches",
    "SYNTHETIC_PRESETS",
    "pad_to_multiple",
    "random_crop",
]

SYNTHETIC_PRESETS = ("tiny-2d", "default-2d", "tiny-3d", "default-3d", "default-3d-2mm", "default-3d-4mm")


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each image of (B, C, *S) to [0, 1] by its own min and max (a constant image becomes 0)."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo).clamp_min(1e-8)


@dataclass
class DataSource:
    """Subjects per split + evaluation pairs of one data set.

    subjects[split][i] -> (image (1, *S) float, labels (1, *S) int64). pairs(split) -> list of (moving, fixed)
    indices; pair_item(split, k) adds the true displacement where known (synthetic data), else None.
    mirror_labels: label value after a left/right flip (None: flipping is not label-safe, augmentation skips it).
    spacing: voxel spacing in mm per spatial axis (tensor order), or None when unknown (recorded in the trained
    model's metadata, deepsim_rt.nn.checkpoint.scale_metadata).
    """

    name: str
    ndim: int
    shape: tuple[int, ...]
    label_names: tuple[str, ...]
    mirror_labels: tuple[int, ...] | None
    _splits: dict
    _pairs: dict
    _truth: object = None  # callable (split, k) -> (ndim, *S) true displacement or None
    spacing: tuple[float, ...] | None = None
    # Synthesis sources only: callable (split, moving, fixed) -> ((image, labels), (image, labels)), a pair drawn
    # by the generative model (both from one base label map where it must be); None: pair two subjects.
    _pair: object = None
    recipe: dict | None = None  # synthesis settings recorded in the trained model's metadata
    intensity: str = "minmax"  # the input contract of the served images (NetConfig.intensity of models trained here)

    def pair(self, split: str, moving: int, fixed: int):
        """((image, labels), (image, labels)) of a training / validation pair (subject, subject by default)."""
        if self._pair is not None:
            return self._pair(split, moving, fixed)
        return self.subject(split, moving), self.subject(split, fixed)

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def size(self, split: str) -> int:
        return len(self._splits[split])

    def subject(self, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._splits[split](i)

    def pairs(self, split: str) -> list[tuple[int, int]]:
        return list(self._pairs[split])

    def true_displacement(self, split: str, k: int) -> torch.Tensor | None:
        return None if self._truth is None else self._truth(split, k)


class _Split:
    def __init__(self, n: int, get) -> None:
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __call__(self, i: int):
        return self.get(i)


def _synthetic(name: str) -> DataSource:
    from deepsim_rt.data.atlas import MIRROR_LABELS
    from deepsim_rt.data.synthetic import SyntheticConfig, SyntheticPairs, SyntheticSubjects, label_names

    cfg = SyntheticConfig.preset(name)
    subjects = {s: SyntheticSubjects(cfg, s) for s in ("train", "val", "test")}
    pairsets = {s: SyntheticPairs(cfg, s, pairs="random") for s in ("val", "test")}

    def getter(split):
        def get(i):
            sub = subjects[split][i]
            return minmax(sub.image[None])[0], sub.labels
        return get

    def truth(split, k):
        return pairsets[split][k]["true_displacement"] if split in pairsets else None

    splits = {s: _Split(len(subjects[s]), getter(s)) for s in subjects}
    pairs = {s: list(p.pairs) for s, p in pairsets.items()}
    pairs["train"] = []
    return DataSource(name=name, ndim=cfg.ndim, shape=tuple(subjects["train"].shape),
                      label_names=tuple(label_names(cfg)), mirror_labels=tuple(MIRROR_LABELS), _splits=splits,
                      _pairs=pairs, _truth=truth, spacing=(float(cfg.voxel_size),) * cfg.ndim)


def _nifti(path: Path) -> DataSource:
    """A folder with images/ and labels/ holding NIfTI files of the same names (3D, or 2D as X x Y x 1).

    Splits are by sorted file name: the last 20 % (at least 2) are test, the 10 % before them (at least 2) val,
    the rest (at least 2) train. Evaluation pairs: every ordered pair of test subjects (at most 64, seeded choice).
    Spacing: the column norms of the affines (mm per array axis); None when the files disagree by more than 1 %
    (a mixed-spacing folder has no one training scale).
    """
    from deepsim_rt.data.nifti import load_nifti

    img_dir, lab_dir = path / "images", path / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise ValueError(f"a NIfTI data folder needs images/ and labels/ subfolders, got {str(path)!r}")
    names = sorted(p.name for p in img_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    n_test = max(2, len(names) // 5)
    n_val = max(2, len(names) // 10)
    if len(names) < n_test + n_val + 2:
        raise ValueError(f"need at least 6 NIfTI images in {str(img_dir)!r} (2 train, 2 val, 2 test), got "
                         f"{len(names)}")
    missing = [n for n in names if not (lab_dir / n).is_file()]
    if missing:
        raise ValueError(f"label maps missing in {str(lab_dir)!r} for {missing[:3]}")

    spacings: dict[str, tuple[float, ...]] = {}

    def read(n: str):
        img, affine, _ = load_nifti(img_dir / n, allow_2d=True)
        lab, _, _ = load_nifti(lab_dir / n, allow_2d=True)
        spacings[n] = tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))
        if img.shape != lab.shape:
            raise ValueError(f"{n}: image shape {img.shape} != label shape {lab.shape}")
        if img.ndim == 3 and img.shape[2] == 1:
            img, lab = img[..., 0], lab[..., 0]
        if not np.allclose(lab, np.round(lab)) or lab.min() < 0:
            raise ValueError(f"{n}: label map must hold non-negative integers")
        return (minmax(torch.from_numpy(np.ascontiguousarray(img))[None, None])[0],
                torch.from_numpy(np.round(lab).astype(np.int64))[None])

    cache: dict[str, tuple] = {}

    def load(n: str):
        if n not in cache:
            cache[n] = read(n)
        return cache[n]

    split_names = {"test": names[-n_test:], "val": names[-n_test - n_val:-n_test], "train": names[:-n_test - n_val]}
    first_img, _ = load(names[0])
    shape = tuple(first_img.shape[1:])
    n_classes = 1 + max(int(load(n)[1].max()) for n in names)
    def getter(ns: list[str]):
        return lambda i: load(ns[i])

    splits = {s: _Split(len(ns), getter(ns)) for s, ns in split_names.items()}
    rng = np.random.default_rng(0)

    def pair_list(n: int) -> list[tuple[int, int]]:
        allp = [(m, f) for m in range(n) for f in range(n) if m != f]
        if len(allp) > 64:
            allp = [allp[k] for k in sorted(rng.choice(len(allp), 64, replace=False))]
        return allp

    pairs = {"train": [], "val": pair_list(len(split_names["val"])), "test": pair_list(len(split_names["test"]))}
    # Every file was read above (n_classes); a 2D image (X x Y [x 1]) keeps the spacing of its first two axes.
    sp = np.array([spacings[n][: len(shape)] for n in names])
    spacing = tuple(float(v) for v in sp[0]) if np.all(np.abs(sp / sp[0] - 1.0) <= 0.01) else None
    return DataSource(name=str(path), ndim=len(shape), shape=shape,
                      label_names=tuple(f"label_{k}" for k in range(n_classes)), mirror_labels=None,
                      _splits=splits, _pairs=pairs, _truth=None, spacing=spacing)


def _synth(name: str) -> DataSource:
    """Brains synthesized from label maps on the fly (deepsim_rt.data.synth): subject i of a split is rendered from
    (seed, split, i) every time it is asked for (train: not cached, 20000 virtual subjects; val / test: cached).
    Images are robust-normalized (percentiles), not min-max."""
    from deepsim_rt.data.atlas import LABEL_NAMES, MIRROR_LABELS
    from deepsim_rt.data.label_maps import anatomy
    from deepsim_rt.data.synth import SynthConfig, render_pair, render_subject

    cfg = SynthConfig.preset(name)
    cache: dict = {}

    def get(split):
        def one(i):
            key = (split, i)
            if key in cache:
                return cache[key]
            r = render_subject(cfg, split, i)
            item = (r.image, r.labels)
            if split != "train":
                cache[key] = item
            return item
        return one

    def pair(split, m, f):
        a, b = render_pair(cfg, split, m, f)
        return (a.image, a.labels), (b.image, b.labels)

    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    splits = {s: _Split(n, get(s)) for s, n in sizes.items()}
    pairs = {"train": [], "val": [(m, (m + 1) % cfg.n_val) for m in range(cfg.n_val)],
             "test": [(m, (m + 1) % cfg.n_test) for m in range(cfg.n_test)]}
    shape = tuple(anatomy(cfg.ndim, cfg.voxel_size).shape[2:])
    # A flip would swap left/right tissue labels correctly, but synthesized brains need no flip augmentation.
    return DataSource(name=name, ndim=cfg.ndim, shape=shape, label_names=LABEL_NAMES,
                      mirror_labels=tuple(MIRROR_LABELS), _splits=splits, _pairs=pairs, _truth=None,
                      spacing=(float(cfg.voxel_size),) * cfg.ndim, _pair=pair, intensity="percentile",
                      recipe={"synthesis": name, **cfg.to_dict(),
                              "label_maps": "MNI152 2009a tissue map (bundled), subdivided; synthesized head; random "
                                            "smooth shapes (registration pairs)"})


def open_source(data: str) -> DataSource:
    """A synthetic preset name, a synthesis preset (SYNTH_PRESETS: brains rendered from label maps) or a NIfTI
    folder path -> DataSource."""
    from deepsim_rt.data.synth import SYNTH_PRESETS

    if data in SYNTHETIC_PRESETS:
        return _synthetic(data)
    if data in SYNTH_PRESETS:
        return _synth(data)
    path = Path(data)
    if path.is_dir():
        return _nifti(path)
    raise ValueError(f"data must be a synthetic preset {SYNTHETIC_PRESETS}, a synthesis preset "
                     f"{tuple(SYNTH_PRESETS)} or a NIfTI folder, got {data!r} (no such folder)")


def item_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one item's random choices, a pure function of (seed, epoch, index, stream)."""
    words = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))


def random_affine_flip(image: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
                       mirror_labels: tuple[int, ...] | None, rotate_deg: float = 10.0, scale: float = 0.1,
                       shear: float = 0.05, translate: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine + left/right flip of one sample (paper's feature-training augmentation).

    image (1, *S) float, labels (1, *S) int64. Rotation +-rotate_deg (in the H-W plane, 3D: about the D axis too
    with the same range), isotropic scaling 1 +- scale, shear +- shear, translation +- translate of the field of
    view; flip of the last (left-right) axis with p = 0.5, only when `mirror_labels` says how labels swap.
    Image: linear, labels: nearest; outside the field of view both are 0 (background).
    """
    nd = image.dim() - 1
    u = lambda n: 2.0 * torch.rand(n, generator=g, dtype=torch.float64) - 1.0  # U(-1, 1)
    flip = bool(torch.rand((), generator=g) < 0.5)
    s = 1.0 + scale * float(u(1))
    a = math.radians(rotate_deg) * u(nd * (nd - 1) // 2)
    sh = shear * u(nd * (nd - 1))
    t = translate * 2.0 * u(nd)  # normalized coords span [-1, 1]
    # affine_grid works in (x, y[, z]) order = reversed tensor axes; build the matrix there.
    m = torch.eye(nd, dtype=torch.float64) * s
    rots = []
    pairs = [(0, 1)] if nd == 2 else [(0, 1), (0, 2), (1, 2)]
    for k, (i, j) in enumerate(pairs):
        r = torch.eye(nd, dtype=torch.float64)
        c, sn = math.cos(float(a[k])), math.sin(float(a[k]))
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -sn, sn, c
        rots.append(r)
    for r in rots:
        m = r @ m
    shm = torch.eye(nd, dtype=torch.float64)
    off = [(i, j) for i in range(nd) for j in range(nd) if i != j]
    for k, (i, j) in enumerate(off):
        shm[i, j] = float(sh[k])
    m = shm @ m
    if flip and mirror_labels is not None:
        m[:, 0] = -m[:, 0]  # x = the last tensor axis = left-right
    theta = torch.cat([m, t.view(nd, 1)], dim=1).to(torch.float32)[None]
    size = (1, 1, *image.shape[1:])
    grid = F.affine_grid(theta, size, align_corners=False)
    img = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lab = F.grid_sample(labels[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    lab = lab.round().long()
    if flip and mirror_labels is not None:
        lab = torch.as_tensor(mirror_labels, dtype=torch.long)[lab]
    return img, lab


class EpochBatches:
    """This process's batches of item indices for one epoch, via torch's DistributedSampler.

    With world size W and a GLOBAL batch B (B % W == 0), rank r's k-th batch is positions k*B + j*W + r of the
    epoch permutation; the union over ranks is the contiguous slice [k*B, (k+1)*B), exactly the single-process
    batch k. The incomplete last batch is dropped. steps_per_epoch = floor(n / B).
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int) -> None:
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes {world}")
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.local = global_batch // world
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {global_batch} is larger than the {n} training items")

    def batch(self, epoch: int, k: int) -> list[int]:
        sampler = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        mine = list(sampler)
        return mine[k * self.local:(k + 1) * self.local]

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, batch index within the epoch)."""
        return divmod(step, self.steps_per_epoch)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, *S) at the end of each spatial axis up to a multiple of `multiple` (no-op if it fits)."""
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % multiple]
    return F.pad(x, pads) if any(pads) else x


def random_crop(tensors: list[torch.Tensor], size: int, g: torch.Generator) -> list[torch.Tensor]:
    """The same random window of `size` voxels per spatial axis cut from each (C, *S) tensor of equal spatial shape
    (an axis shorter than `size` is kept whole). Offsets uniform over the valid positions, drawn from `g`."""
    shape = tensors[0].shape[1:]
    if any(t.shape[1:] != shape for t in tensors):
        raise ValueError(f"random_crop needs tensors of one spatial shape, got {[tuple(t.shape) for t in tensors]}")
    index = [slice(None)]
    for s in shape:
        c = min(size, s)
        start = int(torch.randint(s - c + 1, (), generator=g))
        index.append(slice(start, start + c))
    return [t[tuple(index)] for t in tensors]
