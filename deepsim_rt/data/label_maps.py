"""Label maps that the brain synthesis (deepsim_rt.data.synth) renders images from.

Three kinds, all on the bundled MNI152 2009a grid (deepsim_rt.data.atlas) or any grid you pass:
  anatomy: the bundled MNI152 tissue map (0 background, 1-3 CSF/GM/WM left, 4-6 right), 3D or an axial slice;
  subdivided anatomy + head: every tissue label split into random smooth sub-regions (so regions inside grey and
      white matter get intensities of their own) and non-brain layers drawn around the brain (extra-cerebral CSF,
      skull, scalp; the bundled T1 is skull-stripped, so a head must be synthesized to be in distribution);
  random smooth shapes: argmax of K smooth noise fields (SynthMorph's anatomy-free variant), no anatomy at all.
No label map drawn on an evaluation brain (Colin27 AAL, fsaverage aseg, CAT12 atlases, S1) is used here.

Generation labels ("gen") index the intensity draw; each gen label has an intensity CLASS (GEN_CLASSES) that the
contrast templates of synth.py give a mean to. Scoring labels stay the 7 tissue labels (head layers score as 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepsim_rt.data.atlas import _volume, default_slice_index
from deepsim_rt.data.synthetic import gaussian_blur

__all__ = ["CLASS_NAMES", "TISSUE_CLASS", "anatomy", "subdivide", "add_head", "random_shapes", "smooth_field"]

# Intensity classes (contrast templates in synth.py give each a mean range).
CLASS_NAMES = ("background", "csf", "gm", "wm", "skull", "scalp")
# Tissue label (atlas value) -> intensity class: background, CSF/GM/WM left, CSF/GM/WM right.
TISSUE_CLASS = (0, 1, 2, 3, 1, 2, 3)


def anatomy(ndim: int, voxel_size: int, slice_index: int | None = None) -> torch.Tensor:
    """The bundled MNI152 tissue labels, int64 (1, 1, *S): 3D (D, H, W) or the axial slice `slice_index` (None:
    the default slice through the ventricles). Values 0..6 (atlas.LABEL_NAMES)."""
    _, labels, _ = _volume(int(voxel_size))
    lab = torch.from_numpy(labels.astype("int64"))
    if ndim == 3:
        return lab[None, None].clone()
    if ndim != 2:
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    k = default_slice_index(voxel_size) if slice_index is None else int(slice_index)
    if not 0 <= k < lab.shape[0]:
        raise ValueError(f"slice_index must be in [0, {lab.shape[0]}) at {voxel_size} mm, got {slice_index!r}")
    return lab[k][None, None].clone()


def smooth_field(shape: Sequence[int], channels: int, spacing: float, g: torch.Generator) -> torch.Tensor:
    """(1, channels, *shape) smooth N(0, ~1) noise: one node every `spacing` voxels, blurred by one node,
    upsampled (linear, align_corners=True), then scaled to unit standard deviation per channel."""
    coarse = [max(2, math.ceil((s - 1) / max(spacing, 1e-6)) + 1) for s in shape]
    noise = gaussian_blur(torch.randn((1, channels, *coarse), generator=g), 1.0)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    up = F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)
    sd = up.flatten(2).std(dim=2).clamp_min(1e-6).view(1, channels, *([1] * len(shape)))
    return up / sd


def subdivide(labels: torch.Tensor, parts: int, spacing: float, g: torch.Generator) -> torch.Tensor:
    """Split every foreground label into `parts` smooth random sub-regions: gen = (label - 1) * parts + part + 1
    for label > 0, 0 for background. labels int64 (1, 1, *S) -> int64 (1, 1, *S)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts!r}")
    if parts == 1:
        return labels.clone()
    part = smooth_field(labels.shape[2:], parts, spacing, g).argmax(dim=1, keepdim=True)
    return torch.where(labels > 0, (labels - 1) * parts + part + 1, torch.zeros_like(labels))


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    pool = F.max_pool2d if mask.dim() == 4 else F.max_pool3d
    return pool(mask.float(), 2 * r + 1, stride=1, padding=r) > 0.5 if r > 0 else mask


def add_head(gen: torch.Tensor, brain: torch.Tensor, first_label: int, thickness_vox: Sequence[float],
             g: torch.Generator, spacing: float) -> torch.Tensor:
    """Draw non-brain layers around the brain mask: extra-cerebral CSF, skull, scalp (labels first_label,
    first_label + 1, first_label + 2), each of a thickness that varies smoothly around the head (mean thickness
    `thickness_vox` per layer in voxels, +-40 % along the head). Voxels of `gen` outside every layer keep their
    value. gen, brain: (1, 1, *S) int64 / bool -> int64 (1, 1, *S)."""
    # Distance from the brain in voxels by repeated 3x3(x3) dilation: exact chessboard distance, cheap for the
    # ~10-voxel-thick head at 2 mm (a Euclidean transform would need scipy).
    total = int(math.ceil(sum(thickness_vox) * 1.4)) + 1
    dist = torch.full(brain.shape, float(total + 1))
    cur = brain.bool()
    dist[cur] = 0.0
    for r in range(1, total + 1):
        cur = _dilate(cur, 1)
        dist = torch.where(cur & (dist > r), torch.full_like(dist, float(r)), dist)
    wobble = smooth_field(brain.shape[2:], len(thickness_vox), spacing, g)
    out = gen.clone()
    edge = torch.zeros_like(dist)
    for k, t in enumerate(thickness_vox):
        edge = edge + t * (1.0 + 0.4 * torch.tanh(wobble[:, k:k + 1]))
        layer = (dist > 0) & (dist <= edge) & (out == 0)
        out = torch.where(layer, torch.full_like(out, first_label + k), out)
    return out


def random_shapes(shape: Sequence[int], n_labels: int, spacing: float, g: torch.Generator) -> torch.Tensor:
    """Anatomy-free label map int64 (1, 1, *shape), values 0..n_labels-1: argmax of n_labels smooth noise fields
    with one control node every `spacing` voxels (SynthMorph, Hoffmann et al. 2022)."""
    if n_labels < 2:
        raise ValueError(f"n_labels must be >= 2, got {n_labels!r}")
    return smooth_field(shape, n_labels, spacing, g).argmax(dim=1, keepdim=True)
