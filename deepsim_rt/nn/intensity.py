"""The input intensity contracts of the networks (NetConfig.intensity), one definition for every path.

    normalize(x, "minmax")      per-sample (x - min) / (max - min)                      -> [0, 1]
    normalize(x, "percentile")  per-sample (x - p0.5) / (p99.5 - p0.5), clipped to [0, 1]

Both take (B, C, *S) and return (normalized, lo, scale), lo and scale shaped (B, 1, ..., 1), statistics per sample
over channels and voxels; x = normalized * scale + lo wherever the clip did not act, which is how the runtime and
the serving graphs map "warped" back to the moving image's units. A constant sample (scale 0) normalizes to all
zeros; for "percentile" scale is also 0 when >= 99 % of the voxels share one value (the rest then clip to 0 / 1).

Training on synthesized brains (data.synth.robust_normalize), the runtime (Registrator.register) and the serving
graphs (export.serving.ServingModule) use these functions, so a "percentile" model sees the same inputs everywhere.

Why bisection and not torch.quantile: ONNX has no quantile op, TensorRT has no sort, and its TopK stops at
K = 3840 (0.5 % of a 2 mm brain is 3500+ voxels, of a 1 mm head 35k). `percentile_bounds` finds each order
statistic by PASSES bisection steps on the value over [min, max] (per step one compare and one sum per voxel: a
fixed unrolled graph, no data-dependent shape), snaps it to the largest data value <= the final bracket's top, takes
the next order statistic as the same value (a tie) or the smallest value above it, and interpolates the two as
torch.quantile's "linear" mode does (its float32 rank and torch.lerp's formula). The result is bit for bit
torch.quantile's whenever the order statistic is the only distinct value in the final bracket, whose width is
(max - min) / 2**32 (or one float32 ulp): measured equal on the atlas, the real slices, the 1 mm heads and random
data (tests/test_intensity_contract.py); otherwise it is off by less than that width, relative to p99.5 - p0.5
< 3e-7 with a 1000x outlier voxel, < 3e-4 with a 1e6x one (a corrupt voxel of 1e30 would defeat it). Counts
are float32 sums: exact up to 2**24 voxels per sample (a 256**3 head).
Cost (1 thread, 2 shared cores under load 8): a 2 mm brain (614k voxels) 0.25 s eager / 0.11 s ONNX Runtime
(torch.quantile 0.16 s), a 1 mm head (7.1M) 3.7 s / 2.0 s (torch.quantile 2.1 s); min-max is < 0.2 s for both.
"""

from __future__ import annotations

import torch

from deepsim_rt.nn.config import INTENSITIES

__all__ = ["INTENSITIES", "PERCENTILES", "PASSES", "normalize", "minmax_normalize", "percentile_normalize",
           "percentile_bounds"]

PERCENTILES = (0.5, 99.5)  # the "percentile" contract's bounds, in %, as data.synth.robust_normalize trains with
PASSES = 32  # bisection steps: float32 has a 24-bit mantissa; 32 halvings of [min, max] leave < 2.4e-10 of it


def minmax_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample min-max scaling of (B, C, *S) to [0, 1] (the "minmax" input contract).

    Returns (normalized, lo, scale), lo and scale shaped (B, 1, ..., 1), so that x = normalized * scale + lo.
    A constant sample has scale 0 and normalizes to all zeros. Traceable (no data-dependent Python branch).
    """
    dims = tuple(range(1, x.dim()))
    lo = x.amin(dim=dims, keepdim=True)
    scale = x.amax(dim=dims, keepdim=True) - lo
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x - lo) / safe, lo, scale


def _count_le(flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """flat (B, N), t (B, 1) -> (B, 1) float32 count of flat <= t. Summed as float32: 12x faster than a bool sum
    (which ATen widens to int64 on a slow path: 47 vs 4 ms per 7M voxels) and exact while N <= 2**24 (a 256**3
    head); beyond that a count may round by a few voxels out of 16M, moving a percentile by that many ranks."""
    return (flat <= t).to(flat.dtype).sum(dim=1, keepdim=True)


def _order_statistic(flat: torch.Tensor, rank: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     passes: int) -> torch.Tensor:
    """flat (B, N) float32, rank (B, 1) float32 integer-valued in [0, N), lo / hi (B, 1) the per-sample min / max
    -> (B, 1): the rank-th smallest value per sample (0-based), by bisection on the value with the invariant
    count(flat <= b) >= rank + 1 (true at b = max): the answer lies in (a, b], or is the minimum."""
    a, b = lo, hi
    need = rank + 1
    for _ in range(passes):
        mid = a + (b - a) * 0.5
        enough = _count_le(flat, mid) >= need
        b = torch.where(enough, mid, b)
        a = torch.where(enough, a, mid)
    # Snap to the data: the largest value <= b is the order statistic itself whenever it is the only distinct value
    # in the last bracket (and within (max - min) / 2**passes of it otherwise).
    return torch.where(flat <= b, flat, lo).amax(dim=1, keepdim=True)


def _next_order_statistic(flat: torch.Tensor, rank: torch.Tensor, value: torch.Tensor,
                          hi: torch.Tensor) -> torch.Tensor:
    """The (rank + 1)-th smallest value given the rank-th, `value` (B, 1): the same value if it repeats
    (count(flat <= value) > rank + 1), else the smallest value above it (the maximum if there is none)."""
    above = torch.where(flat > value, flat, hi).amin(dim=1, keepdim=True)
    return torch.where(_count_le(flat, value) >= rank + 2, value, above)


def percentile_bounds(x: torch.Tensor, percentiles: tuple[float, float] = PERCENTILES,
                      passes: int = PASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample percentiles of (B, C, *S) over channels and voxels -> (lo, hi), each (B,) float32.

    Equals torch.quantile(x.flatten(1), q, dim=1, interpolation="linear") (q = percentiles / 100, ranks computed in
    float32 as torch does) up to the bisection's resolution (see the module doc); built from compare, sum, where,
    min and max only, so it exports to ONNX, compiles under AOTInductor and builds in TensorRT at any size.
    """
    if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise ValueError(f"need 0 <= lo < hi <= 100 percent, got {percentiles!r}")
    flat = x.float().flatten(1)  # (B, N)
    n = flat.shape[1]
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    out = []
    for pct in percentiles:
        # torch.quantile: rank = q * (n - 1) in the input's dtype (float32), below = floor, weight = rank - below
        rank = torch.full((1, 1), pct / 100.0, dtype=torch.float32, device=flat.device) * (n - 1)
        below = rank.floor()
        weight = rank - below
        v_below = _order_statistic(flat, below, lo, hi, passes)
        v_above = _next_order_statistic(flat, below, v_below, hi)
        # torch.lerp's formula (the one torch.quantile uses): start + w * (end - start) for w < 0.5, else
        # end - (1 - w) * (end - start); the two agree to one float32 rounding, this one keeps bit equality.
        diff = v_above - v_below
        out.append(torch.where(weight < 0.5, v_below + weight * diff, v_above - (1.0 - weight) * diff)[:, 0])
    return out[0], out[1]


def percentile_normalize(x: torch.Tensor, percentiles: tuple[float, float] = PERCENTILES,
                         passes: int = PASSES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "percentile" input contract on (B, C, *S): ((x - p_lo) / (p_hi - p_lo)).clamp(0, 1) per sample.

    Returns (normalized float32, lo, scale), lo = p_lo and scale = p_hi - p_lo shaped (B, 1, ..., 1), as
    `minmax_normalize` does. A constant sample gives all zeros (scale 0); one whose voxels share one value but for
    < 1 % of them also has scale 0, and those few voxels become 1 (above) or 0 (below), as in training.
    """
    lo_v, hi_v = percentile_bounds(x, percentiles, passes)
    shape = (-1, *([1] * (x.dim() - 1)))
    lo = lo_v.view(shape)
    scale = (hi_v - lo_v).view(shape)
    # 1e-8 as data.synth.robust_normalize (what the nets were trained on): with scale 0 every voxel above p0.5 -> 1
    return ((x.float() - lo) / scale.clamp_min(1e-8)).clamp(0.0, 1.0), lo, scale


def normalize(x: torch.Tensor, intensity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input contract `intensity` (NetConfig.intensity: "minmax" or "percentile") on (B, C, *S)
    -> (normalized, lo, scale), see the module doc."""
    if intensity == "minmax":
        return minmax_normalize(x)
    if intensity == "percentile":
        return percentile_normalize(x)
    raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
