"""Fused multi-layer cosine similarity (DeepSim): Triton kernels -> launchers -> autograd.Function -> function.

Formula (../shared/docs/PAPER_NOTES.md, exactly `reference.multilayer_cosine`):
    cos_l(p) = <a_l(p), b_l(p)> / (sqrt(max(|a_l(p)|^2, eps)) * sqrt(max(|b_l(p)|^2, eps)))
    mean     = (1/L) * sum_l mean_{batch, voxels} cos_l

Design
- ALL levels in ONE launch. Program ids are laid out level after level; level l owns the range
  [stop_{l-1}, stop_l) and each of its programs handles BLOCK_P voxels of one batch item, looping over channels in
  BLOCK_C chunks (one read of each feature map).
- How the kernel reaches L different tensors: every level is passed as its own pointer + scalar arguments
  (a0, b0, ..., a7, b7; up to MAX_LEVELS = 8 per launch, more levels are chunked into further launches that write
  to the same partial-sum buffer). The slots a launch does not use, and the pointers its constexprs prune, are
  passed as None (constexpr None: compiled away, next to nothing to bind). We chose this over the two alternatives:
    * an int64 table of data_ptr()s cast with tl.pointer_type: calls data_ptr() on the host, which fake tensors
      refuse, so torch.compile / torch.export could not trace the triton_op body; it also needs a host->device copy
      of the table on every call (a synchronous cudaMemcpy from pageable memory, ~10 us);
    * concatenating the flattened levels into one buffer: an extra read + write of every feature map, i.e. 2x the
      forward's memory traffic (the forward is bandwidth bound: the target is >= 85 % of the copy bandwidth).
  Scalar arguments cost neither; the price is a long kernel signature and one compiled variant per level count.
- Deterministic reduction: each program writes one partial (its voxel sum already divided by B*N_l*L) to a buffer;
  a one-program kernel then sums the buffer in a fixed order. No atomics touch the scalar, so the loss is bitwise
  reproducible run to run.
- fp32 accumulation for fp32/bf16/fp16 features (fp64 for fp64 features, so gradcheck can run on the kernels).
- Backward recomputes the dot product and both norms per voxel from the inputs (saved: only the inputs), so its
  extra memory is the O(pixels) partial/grad-map buffers, never O(pixels x channels) normalized features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from deepsim_rt._checks import check_choice
from deepsim_rt.kernels._triton_common import (
    acc_dtype,
    cast_out,
    cdiv,
    check_launch_device,
    declare_writes,
    emulate_rtne,
    launch,
    tl,
    triton,
)
from deepsim_rt.kernels.reference import DEFAULT_EPS, check_cosine_inputs

__all__ = ["cosine_fwd", "cosine_bwd", "MultilayerCosineFunction", "multilayer_cosine", "MAX_LEVELS"]

MAX_LEVELS = 8
_FWD_SLOT, _BWD_SLOT = 10, 12  # arguments per level slot of _cos_fwd_kernel / _cos_bwd_kernel
# 256 voxels x 4 channels = a 1024-element tile per load: 8 elements per thread with 4 warps, enough loads in
# flight to stream at bandwidth, and a few hundred programs even at the coarsest level of a 3D brain
# (20x24x28 = 13k voxels -> 53 programs per batch item). Untuned on a GPU yet (the benchmark sweep is to come).
BLOCK_P = 256
BLOCK_C = 4
BLOCK_SUM = 1024


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # sqrt_rn = IEEE-rounded fp32 sqrt (tl.sqrt may lower to the approximate one); fp64 sqrt is always exact.
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _cos_stats(a_ptr, b_ptr, C, sC, base, offs_p, pmask, sP, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """Per-voxel <a, b>, |a|^2, |b|^2 over all channels, accumulated in ACC.

    Accumulates [BLOCK_C, BLOCK_P] tiles elementwise and reduces over the channel axis ONCE after the loop: a
    reduction inside the loop cost three cross-warp reductions (shared memory + barriers) per 4-channel step, and
    92 registers per thread in bf16 (48 with the tile; benchmarks/gpu_static.py).
    """
    dot = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    na2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    nb2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    # int64 voxel offsets: with channels-last strides (sP = C) a 3D brain level reaches 7e6 x 64 > 2**31 / 8.
    poff = offs_p.to(tl.int64) * sP
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c[:, None] < C) & pmask[None, :]
        off = base + offs_c[:, None].to(tl.int64) * sC + poff[None, :]
        a = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        b = tl.load(b_ptr + off, mask=m, other=0.0).to(ACC)
        dot += a * b
        na2 += a * a
        nb2 += b * b
    return tl.sum(dot, axis=0), tl.sum(na2, axis=0), tl.sum(nb2, axis=0)


@triton.jit
def _cos_fwd_level(a_ptr, b_ptr, map_ptr, C, N, sB, sC, sP, tot, local_pid, part_ptr, eps,
                   WRITE_MAP: tl.constexpr, n_levels, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    nblk = tl.cdiv(N, BLOCK_P)
    bi = local_pid // nblk
    offs_p = (local_pid - bi * nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < N
    base = bi.to(tl.int64) * sB
    dot, na2, nb2 = _cos_stats(a_ptr, b_ptr, C, sC, base, offs_p, pmask, sP, ACC, BLOCK_C, BLOCK_P)
    # eps clamps the SQUARED norm (paper), before the square root.
    cos = dot / (_sqrt(tl.maximum(na2, eps), ACC) * _sqrt(tl.maximum(nb2, eps), ACC))
    if WRITE_MAP:
        tl.store(map_ptr + bi.to(tl.int64) * N + offs_p, cos, mask=pmask)
    else:
        # Weight 1 / (B * N_l * L) per partial: the per-level voxel mean, then the equal-weight mean over levels.
        # tl.cast, not .to(): Triton turns an int argument equal to 1 (a 1-voxel level) into a constexpr.
        w = 1.0 / (tl.cast(tot, ACC) * n_levels)
        tl.store(part_ptr, tl.sum(tl.where(pmask, cos, 0.0), axis=0) * w)


@triton.jit
def _cos_fwd_kernel(
    a0, b0, m0, C0, N0, sB0, sC0, sP0, stop0, tot0,
    a1, b1, m1, C1, N1, sB1, sC1, sP1, stop1, tot1,
    a2, b2, m2, C2, N2, sB2, sC2, sP2, stop2, tot2,
    a3, b3, m3, C3, N3, sB3, sC3, sP3, stop3, tot3,
    a4, b4, m4, C4, N4, sB4, sC4, sP4, stop4, tot4,
    a5, b5, m5, C5, N5, sB5, sC5, sP5, stop5, tot5,
    a6, b6, m6, C6, N6, sB6, sC6, sP6, stop6, tot6,
    a7, b7, m7, C7, N7, sB7, sC7, sP7, stop7, tot7,
    part_ptr, part_off, eps, n_levels,
    NUM_LEVELS: tl.constexpr, WRITE_MAP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # part_off: this launch's first slot in the partial buffer (levels beyond MAX_LEVELS launch again).
    pid = tl.program_id(0)
    if pid < stop0:
        _cos_fwd_level(a0, b0, m0, C0, N0, sB0, sC0, sP0, tot0, pid, part_ptr + part_off + pid, eps,
                       WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 1:
        if (pid >= stop0) & (pid < stop1):
            _cos_fwd_level(a1, b1, m1, C1, N1, sB1, sC1, sP1, tot1, pid - stop0, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 2:
        if (pid >= stop1) & (pid < stop2):
            _cos_fwd_level(a2, b2, m2, C2, N2, sB2, sC2, sP2, tot2, pid - stop1, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 3:
        if (pid >= stop2) & (pid < stop3):
            _cos_fwd_level(a3, b3, m3, C3, N3, sB3, sC3, sP3, tot3, pid - stop2, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 4:
        if (pid >= stop3) & (pid < stop4):
            _cos_fwd_level(a4, b4, m4, C4, N4, sB4, sC4, sP4, tot4, pid - stop3, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 5:
        if (pid >= stop4) & (pid < stop5):
            _cos_fwd_level(a5, b5, m5, C5, N5, sB5, sC5, sP5, tot5, pid - stop4, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 6:
        if (pid >= stop5) & (pid < stop6):
            _cos_fwd_level(a6, b6, m6, C6, N6, sB6, sC6, sP6, tot6, pid - stop5, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)
    if NUM_LEVELS > 7:
        if (pid >= stop6) & (pid < stop7):
            _cos_fwd_level(a7, b7, m7, C7, N7, sB7, sC7, sP7, tot7, pid - stop6, part_ptr + part_off + pid, eps,
                           WRITE_MAP, n_levels, ACC, BLOCK_C, BLOCK_P)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One program sums n partials in a fixed order: BLOCK lanes stride the buffer, then one tree sum."""
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _cos_bwd_level(a_ptr, b_ptr, ga_ptr, gb_ptr, gm_ptr, C, N, sB, sC, sP, tot, local_pid, g_ptr, eps,
                   NEED_A: tl.constexpr, NEED_B: tl.constexpr, GRAD_MAP: tl.constexpr, n_levels,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    nblk = tl.cdiv(N, BLOCK_P)
    bi = local_pid // nblk
    offs_p = (local_pid - bi * nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < N
    base = bi.to(tl.int64) * sB
    # Pass 1 recomputes the statistics (nothing but the inputs was saved); pass 2 re-reads the same tile, which
    # a program touched a moment ago (BLOCK_C x BLOCK_P x 2 tensors), so most of it comes from L2.
    dot, na2, nb2 = _cos_stats(a_ptr, b_ptr, C, sC, base, offs_p, pmask, sP, ACC, BLOCK_C, BLOCK_P)
    ra = 1.0 / _sqrt(tl.maximum(na2, eps), ACC)
    rb = 1.0 / _sqrt(tl.maximum(nb2, eps), ACC)
    cos = dot * ra * rb
    if GRAD_MAP:
        g = tl.load(gm_ptr + bi.to(tl.int64) * N + offs_p, mask=pmask, other=0.0).to(ACC)
    else:
        g = tl.load(g_ptr).to(ACC) / (tl.cast(tot, ACC) * n_levels)
    g = tl.where(pmask, g, 0.0)
    # d cos / d a = b / (|a| |b|) - cos * a / |a|^2, where the second term exists only while |a|^2 >= eps
    # (clamp_min passes the gradient at equality, as ATen's clamp_min backward does).
    cross = g * ra * rb
    self_a = tl.where(na2 >= eps, g * cos * ra * ra, 0.0)
    self_b = tl.where(nb2 >= eps, g * cos * rb * rb, 0.0)
    # Gradients have the inputs' strides (the launcher allocates them so), so they are stored at the offsets the
    # inputs were loaded from, in the same register layout: with channels-last inputs, contiguous (B, C, N)
    # gradients forced 6 layout conversions between threads (shared memory, 24 bar.sync) into every channel step
    # (triton 3.9, sm_90). (Loop-carried pointers instead of offsets rebuilt per step: 128 registers in the odd-shape
    # variant, 48 as written.)
    poff = offs_p.to(tl.int64) * sP
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c[:, None] < C) & pmask[None, :]
        off = base + offs_c[:, None].to(tl.int64) * sC + poff[None, :]
        a = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        b = tl.load(b_ptr + off, mask=m, other=0.0).to(ACC)
        if NEED_A:
            ga = cross[None, :] * b - self_a[None, :] * a
            tl.store(ga_ptr + off, cast_out(ga, ga_ptr.dtype.element_ty, EMULATE_RTNE), mask=m)
        if NEED_B:
            gb = cross[None, :] * a - self_b[None, :] * b
            tl.store(gb_ptr + off, cast_out(gb, gb_ptr.dtype.element_ty, EMULATE_RTNE), mask=m)


@triton.jit
def _cos_bwd_kernel(
    a0, b0, ga0, gb0, gm0, C0, N0, sB0, sC0, sP0, stop0, tot0,
    a1, b1, ga1, gb1, gm1, C1, N1, sB1, sC1, sP1, stop1, tot1,
    a2, b2, ga2, gb2, gm2, C2, N2, sB2, sC2, sP2, stop2, tot2,
    a3, b3, ga3, gb3, gm3, C3, N3, sB3, sC3, sP3, stop3, tot3,
    a4, b4, ga4, gb4, gm4, C4, N4, sB4, sC4, sP4, stop4, tot4,
    a5, b5, ga5, gb5, gm5, C5, N5, sB5, sC5, sP5, stop5, tot5,
    a6, b6, ga6, gb6, gm6, C6, N6, sB6, sC6, sP6, stop6, tot6,
    a7, b7, ga7, gb7, gm7, C7, N7, sB7, sC7, sP7, stop7, tot7,
    g_ptr, eps, n_levels,
    NUM_LEVELS: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, GRAD_MAP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < stop0:
        _cos_bwd_level(a0, b0, ga0, gb0, gm0, C0, N0, sB0, sC0, sP0, tot0, pid, g_ptr, eps,
                       NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 1:
        if (pid >= stop0) & (pid < stop1):
            _cos_bwd_level(a1, b1, ga1, gb1, gm1, C1, N1, sB1, sC1, sP1, tot1, pid - stop0, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 2:
        if (pid >= stop1) & (pid < stop2):
            _cos_bwd_level(a2, b2, ga2, gb2, gm2, C2, N2, sB2, sC2, sP2, tot2, pid - stop1, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 3:
        if (pid >= stop2) & (pid < stop3):
            _cos_bwd_level(a3, b3, ga3, gb3, gm3, C3, N3, sB3, sC3, sP3, tot3, pid - stop2, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 4:
        if (pid >= stop3) & (pid < stop4):
            _cos_bwd_level(a4, b4, ga4, gb4, gm4, C4, N4, sB4, sC4, sP4, tot4, pid - stop3, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 5:
        if (pid >= stop4) & (pid < stop5):
            _cos_bwd_level(a5, b5, ga5, gb5, gm5, C5, N5, sB5, sC5, sP5, tot5, pid - stop4, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 6:
        if (pid >= stop5) & (pid < stop6):
            _cos_bwd_level(a6, b6, ga6, gb6, gm6, C6, N6, sB6, sC6, sP6, tot6, pid - stop5, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)
    if NUM_LEVELS > 7:
        if (pid >= stop6) & (pid < stop7):
            _cos_bwd_level(a7, b7, ga7, gb7, gm7, C7, N7, sB7, sC7, sP7, tot7, pid - stop6, g_ptr, eps,
                           NEED_A, NEED_B, GRAD_MAP, n_levels, ACC, BLOCK_C, BLOCK_P, EMULATE_RTNE)


declare_writes(_cos_fwd_kernel, lambda kw: ([f"m{i}" for i in range(kw["NUM_LEVELS"])] if kw["WRITE_MAP"]
                                           else ["part_ptr"]))
declare_writes(_sum_partials_kernel, lambda kw: ["out_ptr"])
declare_writes(_cos_bwd_kernel, lambda kw: [f"{g}{i}" for g, need in (("ga", kw["NEED_A"]), ("gb", kw["NEED_B"]))
                                            if need for i in range(kw["NUM_LEVELS"])])


# ----------------------------------------------------------------------------------------------------------------
# Launchers (checks, allocation, grid, launch; no autograd)
# ----------------------------------------------------------------------------------------------------------------
def _flat_level(fa: torch.Tensor, fb: torch.Tensor):
    """(B, C, *S) pair -> ((B, C, N) views or copies sharing one stride triple, B, C, N, (sB, sC, sP)).

    Any layout whose spatial dims collapse to one stride (contiguous, channels-last, a batch or channel slice)
    is read in place; otherwise, or when a and b disagree on strides, both are made contiguous.
    """
    B, C = fa.shape[0], fa.shape[1]
    N = math.prod(fa.shape[2:])
    va, vb = fa.flatten(2), fb.flatten(2)
    if _strides(va) != _strides(vb):
        va, vb = va.contiguous(), vb.contiguous()
    return va, vb, B, C, N, _strides(va)


def _strides(v: torch.Tensor) -> tuple[int, ...]:
    # A size-1 dim's stride never matters: normalise it so layouts compare equal.
    return tuple(0 if n == 1 else s for n, s in zip(v.shape, v.stride(), strict=True))


def _grad_buffers(feats: Sequence[torch.Tensor], levels: list) -> list[torch.Tensor]:
    """Empty gradients, one per level, each with the flattened strides of the level's (B, C, N) view, because the
    backward kernel stores at the offsets it loaded from. Dense inputs (contiguous, channels-last) get gradients in
    their own layout; a level read in place from a non-dense view (a channel slice) is switched to contiguous
    copies here (rare), so that a contiguous gradient matches it. Mutates `levels` for those."""
    grads = []
    for i, f in enumerate(feats):
        va, vb, B, C, N, st = levels[i]
        g = torch.empty_like(f)  # preserve_format: a dense f keeps its strides
        try:
            gv = g.view(B, C, N)
        except RuntimeError:  # spatial dims that do not merge (a transposed view): the level was copied anyway
            gv = None
        if gv is None or _strides(gv) != st:
            g = torch.empty(f.shape, device=f.device, dtype=f.dtype)
            gv = g.view(B, C, N)
            if _strides(gv) != st:
                levels[i] = (va.contiguous(), vb.contiguous(), B, C, N, _strides(gv))
        grads.append(g)
    return grads


def _check_eps(eps: float) -> float:
    # Same rule as the reference: eps <= 0 turns an all-zero feature vector into 0/0 = NaN.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive number (clamp on the squared feature norm), got {eps!r}")
    return float(eps)


def _prepare(feats_a, feats_b, reduction: str, eps: float):
    check_cosine_inputs(feats_a, feats_b, reduction)
    check_launch_device("feats_a[0]", feats_a[0])
    eps = _check_eps(eps)
    levels = [_flat_level(fa, fb) for fa, fb in zip(feats_a, feats_b, strict=True)]
    acc = acc_dtype(*(fa.dtype for fa in feats_a))
    return levels, acc, eps


def _schedule(levels) -> list[list[int]]:
    """Level indices per launch (at most MAX_LEVELS each), the levels with the most channels first.

    Program ids run level after level and the GPU starts them roughly in id order; a program's work is BLOCK_P x C
    loads, so the coarsest level (128 channels, fewest programs, the longest ones) placed last left a tail of a
    few long programs on an otherwise idle GPU. Placed first, the short programs of the fine levels fill in
    behind it. The order is fixed by the channel counts, so the reduction stays deterministic.
    """
    order = sorted(range(len(levels)), key=lambda i: -levels[i][3])
    return [order[s:s + MAX_LEVELS] for s in range(0, len(order), MAX_LEVELS)]


def cosine_fwd(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], eps: float = DEFAULT_EPS,
               reduction: str = "mean") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Forward launcher. Levels (B, C_l, *S_l) -> 0-dim similarity ("mean") or L maps (B, *S_l) ("none").

    Output dtype fp32 (fp64 if any level is fp64). Launches ceil(L / 8) kernels, plus one tiny fixed-order
    summation kernel for "mean".
    """
    levels, acc, eps = _prepare(feats_a, feats_b, reduction, eps)
    device = feats_a[0].device
    n_levels = len(levels)
    write_map = reduction == "none"
    nprog = [lv[2] * cdiv(lv[4], BLOCK_P) for lv in levels]
    maps = [torch.empty((fa.shape[0], *fa.shape[2:]), device=device, dtype=acc_dtype(fa.dtype))
            for fa in feats_a] if write_map else None
    part = torch.empty(0 if write_map else sum(nprog), device=device, dtype=acc)
    start = 0
    for chunk in _schedule(levels):
        args = []
        stop = 0
        for lvl in chunk:
            va, vb, B, C, N, (sB, sC, sP) = levels[lvl]
            stop += nprog[lvl]
            # A pointer the launch never touches (WRITE_MAP pruned) is None: nothing to bind, and no tensor that
            # torch's mutation analysis could take for an output.
            args += [va, vb, maps[lvl] if write_map else None, C, N, sB, sC, sP, stop, B * N]
        # Unused slots (pruned by NUM_LEVELS): None, i.e. constexpr None for Triton. Binding ~100 arguments cost
        # ~33 us per launch (triton 3.6, benchmarks/launch_cost.py); None ones cost next to nothing.
        args += [None] * (_FWD_SLOT * (MAX_LEVELS - len(chunk)))
        launch(_cos_fwd_kernel, (stop,), *args, part, start, eps, n_levels,
               NUM_LEVELS=len(chunk), WRITE_MAP=write_map, ACC=tl.float64 if acc == torch.float64 else tl.float32,
               BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        start += stop
    if write_map:
        return tuple(maps)
    out = torch.empty((), device=device, dtype=acc)
    launch(_sum_partials_kernel, (1,), part, out, part.numel(), BLOCK=BLOCK_SUM)
    return out


def cosine_bwd(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
               grad: torch.Tensor | Sequence[torch.Tensor | None], eps: float = DEFAULT_EPS,
               reduction: str = "mean", need_a: bool = True, need_b: bool = True,
               ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Backward launcher: upstream grad (0-dim for "mean", L maps (B, *S_l) for "none"; None = zeros) ->
    (grads of feats_a or None, grads of feats_b or None), each level in its input's dtype and, for dense inputs,
    its layout (channels-last in, channels-last out; other views: contiguous).
    One launch per 8 levels computes both gradients from one recomputation of the norms.
    """
    levels, acc, eps = _prepare(feats_a, feats_b, reduction, eps)
    check_choice("reduction", reduction, ("mean", "none"))
    device = feats_a[0].device
    n_levels = len(levels)
    grad_map = reduction == "none"
    if grad_map:
        if isinstance(grad, torch.Tensor) or len(grad) != n_levels:
            raise ValueError(f"reduction='none' needs one grad map per level ({n_levels}), got {type(grad).__name__}")
        gmaps = []
        for fa, g in zip(feats_a, grad, strict=True):
            want = (fa.shape[0], *fa.shape[2:])
            if g is None:
                g = torch.zeros(want, device=device, dtype=acc)
            elif tuple(g.shape) != want:
                raise ValueError(f"grad map must have shape {want}, got {tuple(g.shape)}")
            gmaps.append(g.contiguous())  # autograd hands expanded (stride-0) grads for sums
        gscalar = None  # never read: GRAD_MAP is True
    else:
        if not isinstance(grad, torch.Tensor) or grad.numel() != 1:
            raise ValueError(f"reduction='mean' needs a 1-element grad, got {grad!r:.80}")
        gscalar = grad.reshape(())
        gmaps = None  # never read: GRAD_MAP is False
    if not (need_a or need_b):
        return None, None
    grads_a = _grad_buffers(feats_a, levels) if need_a else None
    grads_b = _grad_buffers(feats_b, levels) if need_b else None
    for chunk in _schedule(levels):
        args = []
        stop = 0
        for lvl in chunk:
            va, vb, B, C, N, (sB, sC, sP) = levels[lvl]
            stop += B * cdiv(N, BLOCK_P)
            # None for what the constexprs prune (NEED_A / NEED_B / GRAD_MAP) and for the unused slots below.
            args += [va, vb, grads_a[lvl] if need_a else None, grads_b[lvl] if need_b else None,
                     gmaps[lvl] if grad_map else None, C, N, sB, sC, sP, stop, B * N]
        args += [None] * (_BWD_SLOT * (MAX_LEVELS - len(chunk)))
        launch(_cos_bwd_kernel, (stop,), *args, gscalar, eps, n_levels,
               NUM_LEVELS=len(chunk), NEED_A=need_a, NEED_B=need_b, GRAD_MAP=grad_map,
               ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
               EMULATE_RTNE=emulate_rtne(_cos_bwd_kernel, *(fa.dtype for fa in feats_a)))
    return grads_a, grads_b


# ----------------------------------------------------------------------------------------------------------------
# Autograd + public function
# ----------------------------------------------------------------------------------------------------------------
class MultilayerCosineFunction(torch.autograd.Function):
    """apply(eps, reduction, n_levels, *feats_a, *feats_b). Saves only the inputs (the backward recomputes)."""

    @staticmethod
    def forward(ctx, eps, reduction, n_levels, *feats):
        fa, fb = feats[:n_levels], feats[n_levels:]
        ctx.eps, ctx.reduction, ctx.n_levels = eps, reduction, n_levels
        ctx.save_for_backward(*feats)
        return cosine_fwd(fa, fb, eps, reduction)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n_levels
        feats = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        need_a, need_b = any(need[:n]), any(need[n:])
        grad = grads[0] if ctx.reduction == "mean" else grads
        ga, gb = cosine_bwd(feats[:n], feats[n:], grad, ctx.eps, ctx.reduction, need_a, need_b)
        ga = [g if r else None for g, r in zip(ga, need[:n], strict=True)] if ga is not None else [None] * n
        gb = [g if r else None for g, r in zip(gb, need[n:], strict=True)] if gb is not None else [None] * n
        return (None, None, None, *ga, *gb)


def multilayer_cosine(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], eps: float = DEFAULT_EPS,
                      reduction: str = "mean") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """DeepSim similarity on the Triton kernels (eager path; same contract as `reference.multilayer_cosine`).

    feats_a, feats_b: L levels, level l (B, C_l, *S_l), same shape/dtype/device in a and b.
    eps clamps the squared norm. "mean" -> 0-dim fp32 (fp64 for fp64 inputs); "none" -> tuple of (B, *S_l).
    Unlike the reference, inputs are not scanned for NaN (a full extra read and a host sync per call).
    """
    check_cosine_inputs(feats_a, feats_b, reduction)
    out = MultilayerCosineFunction.apply(eps, reduction, len(feats_a), *feats_a, *feats_b)
    return tuple(out) if reduction == "none" else out
