"""Change maps of a NIfTI pair in world space: orientation, voxel size and grids from the affines, as `register`.

    res = world_change_maps(detector, moving, moving_affine, fixed, fixed_affine)
    res.maps["semantic"], res.maps["residual"], res.maps["jacobian"]   # (*S_fixed) float32, the fixed file's grid

`deepsim-rt changes` ran the networks on the files' voxel arrays as they were: the same pair with its first axis
reversed (same world image) scored 18x higher, and the 2 mm networks ran on 1 mm arrays. Here, as `register` does:
1. Orientation (3D): both arrays go to the model's training axis order (pipeline.qc.training_profile; the
   bundled models and any model that records none: the atlas' S, A, R array axes) by exact axis permutation and
   flips (pipeline.orientation.Reorientation, the one `register` uses; no resampling), and every map comes back
   to the fixed file's own axis order at the end.
2. Grids and spacing: moving goes onto the fixed grid from the two affines when they differ, and the registration
   network runs at its training spacing (pipeline.world.register_world + Registrator.register(spacing=)); the
   displacement u comes back on the fixed grid.
3. Scores: residual |warped - fixed| and jacobian |log det J(u)| on the fixed grid (full resolution); semantic
   1 - cos of the extractor's features computed at the EXTRACTOR's training spacing (its checkpoint's spacing_mm;
   anti-aliased like the network input, transforms.scale) and interpolated back linearly to the fixed grid.
   An extractor trained at another spacing than the registration model (default-3d's 4 mm autoencoder with its
   2 mm net) is said in `notes`.
Intensities: fixed min-max normalized; warped with the MOVING image's min-max (as the detector normalizes moving
before warping), so identical inputs score 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WorldChanges", "world_change_maps", "extractor_spacing_note"]


@dataclass
class WorldChanges:
    """maps: score name -> (*S_fixed) float32 in the fixed file's axis order; level_means: per-level semantic mean;
    facts: JSON-ready record (orientation, grids, network and semantic spacing); notes: said to the user."""

    maps: dict[str, np.ndarray]
    level_means: list[float]
    facts: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def extractor_spacing_note(model_spacing, extractor_spacing, extractor: str) -> str | None:
    """A note when the extractor was trained at another voxel size than the registration model."""
    if model_spacing is None or extractor_spacing is None:
        return None
    if np.allclose(np.asarray(model_spacing, float), np.asarray(extractor_spacing, float), rtol=0.05):
        return None
    fmt = lambda s: "x".join(f"{v:g}" for v in s)  # noqa: E731
    return (f"the extractor {extractor} was trained at {fmt(extractor_spacing)} mm voxels, the registration model at "
            f"{fmt(model_spacing)} mm: the semantic score is computed at the extractor's spacing (coarser or finer "
            "maps than the registration); give --extractor trained at the model's spacing to match")


def world_change_maps(det, moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray,
                      fixed_affine: np.ndarray, names: tuple[str, str] = ("moving", "fixed")) -> WorldChanges:
    """Change maps of moving (*S_m) onto fixed (*S_f), NIfTI arrays with their (4, 4) affines (module docstring).

    det: an anomaly.ChangeDetector with a registrator. Returns WorldChanges on the fixed file's grid."""
    import torch

    from deepsim_rt.anomaly.scores import intensity_residual, jacobian_score, semantic_change
    from deepsim_rt.nn.checkpoint import read_spacing
    from deepsim_rt.pipeline.orientation import DEFAULT_AXCODES, Reorientation
    from deepsim_rt.pipeline.qc import training_profile
    from deepsim_rt.pipeline.world import register_world
    from deepsim_rt.transforms.grid import Grid
    from deepsim_rt.transforms.resample import grid_coords, sample
    from deepsim_rt.transforms.scale import SpacingPlan

    reg = det.registrator
    nd = det.ndim
    target = training_profile(reg.source).axcodes or DEFAULT_AXCODES
    f_ro = m_ro = None
    if nd == 3:  # 2D files keep their axes (a single-slice NIfTI's in-plane order is the model's)
        f_ro = Reorientation.of(fixed_affine, fixed.shape, target)
        m_ro = Reorientation.of(moving_affine, moving.shape, target)
        m_r, m_aff = m_ro.to_model(moving), m_ro.affine_to_model(moving_affine)
        f_r, f_aff = f_ro.to_model(fixed), f_ro.affine_to_model(fixed_affine)
    else:
        m_r, m_aff, f_r, f_aff = moving, moving_affine, fixed, fixed_affine
    notes: list[str] = []

    def run(m, f, lab, spacing=None):
        return reg.register(m, f, lab, spacing=spacing)

    warped, u, _, grid = register_world(run, m_r, m_aff, f_r, f_aff, None, None, "nearest", names)
    dev = det.device
    lo, hi = float(m_r.min()), float(m_r.max())
    w_n = torch.from_numpy((warped - lo) / max(hi - lo, 1e-12)).float()[None, None].to(dev)
    f_lo, f_hi = float(fixed.min()), float(fixed.max())
    f_n = torch.from_numpy((f_r - f_lo) / max(f_hi - f_lo, 1e-12)).float()[None, None].to(dev)

    fixed_grid = Grid.of(f_r.shape, f_aff, names[1])
    ext_spacing = read_spacing(det.extractor_source) if str(det.extractor_source).endswith(".safetensors") else None
    note = extractor_spacing_note(reg.model_spacing, ext_spacing, det.extractor_source)
    if note:
        notes.append(note)
    run_spacing = ext_spacing or reg.model_spacing or fixed_grid.spacing
    plan = SpacingPlan.make(f_r.shape, fixed_grid.spacing, run_spacing)
    with torch.inference_mode():
        semantic, levels = semantic_change(det.extractor, plan.image_to_model(w_n), plan.image_to_model(f_n))
        if plan.resample:  # model grid -> fixed grid, linear (as the displacement comes back, transforms.scale)
            coords = grid_coords(plan.model_grid, plan.input_grid, device=dev)
            semantic = sample(semantic[:, None], coords, "linear", "border")[:, 0]
            levels = tuple(sample(lv[:, None], coords, "linear", "border")[:, 0] for lv in levels)
        residual = intensity_residual(w_n, f_n)
        jac, _ = jacobian_score(torch.from_numpy(u)[None].float().to(dev))
    maps = {"semantic": semantic, "residual": residual, "jacobian": jac}
    back = f_ro.from_model if f_ro is not None else (lambda a: a)
    maps = {k: back(v[0].float().cpu().numpy()).astype(np.float32) for k, v in maps.items()}
    facts = {
        "orientation": None if f_ro is None else {
            "fixed_file": "".join(f_ro.source), "moving_file": "".join(m_ro.source), "model": "".join(target),
            "reoriented": not (f_ro.identity and m_ro.identity)},
        **grid,
        "semantic": {"spacing_mm": [round(float(s), 6) for s in plan.model_spacing], "shape": list(plan.model_shape),
                     "resampled": plan.resample, "extractor_spacing_mm": None if ext_spacing is None
                     else list(ext_spacing)},
    }
    return WorldChanges(maps, [float(lv.mean()) for lv in levels], facts, notes)

