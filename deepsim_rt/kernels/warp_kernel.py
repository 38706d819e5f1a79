"""2D bilinear / 3D trilinear (and nearest) warping: Triton kernels -> launchers -> autograd.Function -> function.

Semantics exactly `reference.warp`: out(p) = image(p + u(p)), u in voxel units (channel i along spatial axis i),
align_corners=True, padding "border" (clamp the coordinate, ATen's clip_coordinates) or "zeros", nearest rounds
half to even (ATen's nearbyint). The kernels work in voxel coordinates directly: no identity or normalized grid
exists anywhere (the reference's normalize -> unnormalize round trip costs ~1 ulp, hence fp32 tolerances of a few
1e-6 relative between the two).

Design
- One program = BLOCK output voxels of one batch item, all C channels: the displacement is read and the corner
  indices/weights are computed once, then reused for every channel (C = 1 for images, ndim for integration).
- Backward, displacement: every output voxel owns its own displacement gradient (d out / d p summed over
  channels), so it is a plain store, no atomics, in the same pass.
- Backward, image: a scatter (each output voxel spreads its gradient to 4 / 8 corners) with relaxed fp32 atomics,
  and it is skipped entirely when the image needs no gradient (registration training: the moving image is data,
  only the displacement learns). ATen's grid_sampler backward always pays for this scatter.
- deterministic=True: the image gradient with no atomics. A first kernel writes, for every (voxel, corner), the
  destination index and its weight; a stable sort groups them by destination (in a fixed (voxel, corner) order
  inside each group); a gather kernel then sums each group sequentially. Same result bit for bit on every run.
  Costs a sort of B*N*2^ndim keys; a group whose destination collects many samples (strong border clamping) is
  summed by one lane, so keep it for the runs that need reproducibility.
"""

from __future__ import annotations

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
from deepsim_rt.kernels.reference import check_warp_inputs

__all__ = ["warp_fwd", "warp_bwd", "warp_self_bwd", "WarpFunction", "warp"]

# 256 voxels per program (2 per thread with 4 warps): 8 gathers x C channels in flight per thread, and
# 27k programs for a 160x192x224 volume, > 200 waves on 132 SMs. Untuned on a GPU yet.
BLOCK = 256
# Backward: 8 warps = ONE voxel per thread. With 2 per thread (4 warps) and every dim a multiple of 16 (a brain
# volume), the loads vectorise by 2 while the atomics cannot, so each channel step converted layouts through
# shared memory (24 conversions, 47 barriers) and the integrate backward took 184 registers (sm_90, triton 3.9);
# benchmarks/gpu_static.py measures the figure this setting gives.
BWD_WARPS = 8
# Gather kernel (deterministic image gradient): one lane per destination voxel.
BLOCK_GATHER = 256


# ----------------------------------------------------------------------------------------------------------------
# Per-axis coordinate helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rint(x):
    """Round half to even, exactly (floor(x + 0.5) would misround 0.49999997 + 0.5 == 1.0 in fp32)."""
    f = tl.floor(x)
    r = x - f  # exact: f and x share the binade or f == 0
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (r > 0.5) | ((r == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _source_coord(idx, u, n, BORDER: tl.constexpr, COMPUTE: tl.constexpr):
    """Sampling coordinate along one axis and d coord / d u (0 where border padding clamps, else 1)."""
    nf = tl.cast(n - 1, COMPUTE)  # tl.cast: an int argument equal to 1 arrives as a constexpr
    x = idx.to(COMPUTE) + u
    if BORDER:
        # ATen's clip_coordinates_set_grad: the borders themselves count as outside (gradient 0 at x == 0 and
        # x == n - 1), which matters for zero displacement at the edge voxels.
        gm = tl.where((x > 0.0) & (x < nf), 1.0, 0.0).to(COMPUTE)
        x = tl.minimum(tl.maximum(x, 0.0), nf)
    else:
        gm = tl.full(x.shape, 1.0, COMPUTE)
    return x, gm, nf


@triton.jit
def _linear_axis(idx, u, n, BORDER: tl.constexpr, COMPUTE: tl.constexpr):
    """Two corner indices (clamped in range, so masked lanes still form valid addresses), their weights
    (ATen's order: w0 = (x0 + 1) - x, w1 = x - x0), validity masks (zeros padding) and d coord / d u."""
    x, gm, nf = _source_coord(idx, u, n, BORDER, COMPUTE)
    x0 = tl.floor(x)
    x1 = x0 + 1.0
    w0 = x1 - x
    w1 = x - x0
    # Validity is decided on the float coordinates: a huge displacement must not wrap an int32 index back in range.
    v0 = (x0 >= 0.0) & (x0 <= nf)
    v1 = (x1 >= 0.0) & (x1 <= nf)
    i0 = tl.minimum(tl.maximum(x0, 0.0), nf).to(tl.int32)
    i1 = tl.minimum(tl.maximum(x1, 0.0), nf).to(tl.int32)
    return i0, i1, w0, w1, v0, v1, gm


@triton.jit
def _nearest_axis(idx, u, n, BORDER: tl.constexpr, COMPUTE: tl.constexpr):
    x, gm, nf = _source_coord(idx, u, n, BORDER, COMPUTE)
    xr = _rint(x)
    valid = (xr >= 0.0) & (xr <= nf)
    return tl.minimum(tl.maximum(xr, 0.0), nf).to(tl.int32), valid


@triton.jit
def _pick(k: tl.constexpr, a, b):
    if k == 0:
        return a
    else:
        return b


@triton.jit
def _voxel_setup(D, H, W, s_fb, s_fd, s_fh, s_fw, BLOCK: tl.constexpr):
    """This program's voxels: flat offsets, mask, (d, h, w) indices, and the flow's element offset per voxel.

    Takes no pointer on purpose: torch's mutation analysis (triton_op / torch.compile / AOTInductor) follows a
    store address back through every argument of a called function, so a flow_ptr passed in here made the flow
    count as written in every warp kernel (and cloned before every compiled launch). The kernels load the flow
    themselves at these offsets (flow channel i = spatial axis i).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    N = D * H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    pm = offs < N
    wi = offs % W
    t = offs // W
    hi = t % H
    di = t // H
    foff = b * s_fb + di * s_fd + hi * s_fh + wi * s_fw
    return b, N, offs, pm, di, hi, wi, foff


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _warp_fwd_kernel(img_ptr, flow_ptr, out_ptr, C, D, H, W,
                     s_ib, s_ic, s_id, s_ih, s_iw,
                     s_fb, s_fc, s_fd, s_fh, s_fw,
                     NDIM: tl.constexpr, BORDER: tl.constexpr, NEAREST: tl.constexpr, ADD_SELF: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    b, N, offs, pm, di, hi, wi, foff = _voxel_setup(D, H, W, s_fb, s_fd, s_fh, s_fw, BLOCK)
    # Loaded here, not in a helper taking flow_ptr (see _voxel_setup); 2D: the depth load is masked off (ud = 0).
    ud = tl.load(flow_ptr + foff, mask=pm & (NDIM == 3), other=0.0).to(COMPUTE)
    uh = tl.load(flow_ptr + foff + (NDIM - 2) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    uw = tl.load(flow_ptr + foff + (NDIM - 1) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    ib = img_ptr + b * s_ib
    ob = out_ptr + b * C * N + offs  # output is contiguous (B, C, *S)
    if NEAREST:
        jh, vh = _nearest_axis(hi, uh, H, BORDER, COMPUTE)
        jw, vw = _nearest_axis(wi, uw, W, BORDER, COMPUTE)
        off = jh * s_ih + jw * s_iw
        m = pm & vh & vw
        if NDIM == 3:
            jd, vd = _nearest_axis(di, ud, D, BORDER, COMPUTE)
            off += jd * s_id
            m = m & vd
        # Channel loops advance 64-bit pointers (no int32 channel x stride product can overflow).
        for _c in range(C):
            # Raw load/store in the image's own dtype: integer label maps stay exact whatever their range.
            v = tl.load(ib + off, mask=m, other=0)
            tl.store(ob, v, mask=pm)
            ib += s_ic
            ob += N
    else:
        h0, h1, wh0, wh1, vh0, vh1, _gh = _linear_axis(hi, uh, H, BORDER, COMPUTE)
        w0, w1, ww0, ww1, vw0, vw1, _gw = _linear_axis(wi, uw, W, BORDER, COMPUTE)
        if NDIM == 3:
            d0, d1, wd0, wd1, vd0, vd1, _gd = _linear_axis(di, ud, D, BORDER, COMPUTE)
        else:  # 2D: one degenerate depth "corner" with weight 1 at offset 0
            d0, d1, wd0, wd1, vd0, vd1 = di, di, 1.0, 0.0, pm, pm
        for _c in range(C):
            cb = ib
            acc = tl.zeros((BLOCK,), COMPUTE)
            for kd in tl.static_range(NDIM - 1):
                for kh in tl.static_range(2):
                    for kw in tl.static_range(2):
                        off = (_pick(kd, d0, d1) * s_id + _pick(kh, h0, h1) * s_ih + _pick(kw, w0, w1) * s_iw)
                        m = pm & _pick(kd, vd0, vd1) & _pick(kh, vh0, vh1) & _pick(kw, vw0, vw1)
                        wgt = _pick(kd, wd0, wd1) * _pick(kh, wh0, wh1) * _pick(kw, ww0, ww1)
                        v = tl.load(cb + off, mask=m, other=0.0).to(COMPUTE)
                        acc += v * wgt
            if ADD_SELF:
                # Scaling-and-squaring step u + u o (id + u): the image IS the displacement, so add its value here.
                acc += tl.load(cb + di * s_id + hi * s_ih + wi * s_iw, mask=pm, other=0.0).to(COMPUTE)
            tl.store(ob, cast_out(acc, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=pm)
            ib += s_ic
            ob += N


@triton.jit
def _warp_bwd_kernel(gout_ptr, img_ptr, flow_ptr, gimg_ptr, gflow_ptr, C, D, H, W,
                     s_ib, s_ic, s_id, s_ih, s_iw,
                     s_fb, s_fc, s_fd, s_fh, s_fw,
                     NDIM: tl.constexpr, BORDER: tl.constexpr, NEAREST: tl.constexpr,
                     NEED_IMG: tl.constexpr, NEED_FLOW: tl.constexpr, SELF: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """gout, gimg (fp32/fp64 atomic buffer) and gflow are contiguous; image and flow may be strided.

    SELF (a scaling-and-squaring step v = u + u o (id + u): image = flow = u, C = NDIM): u's whole gradient
    (identity term + image-role scatter + displacement role) is accumulated into gimg; gflow is not touched.
    """
    b, N, offs, pm, di, hi, wi, foff = _voxel_setup(D, H, W, s_fb, s_fd, s_fh, s_fw, BLOCK)
    # Loaded here, not in a helper taking flow_ptr (see _voxel_setup); 2D: the depth load is masked off (ud = 0).
    ud = tl.load(flow_ptr + foff, mask=pm & (NDIM == 3), other=0.0).to(COMPUTE)
    uh = tl.load(flow_ptr + foff + (NDIM - 2) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    uw = tl.load(flow_ptr + foff + (NDIM - 1) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    ib = img_ptr + b * s_ib
    gb = gout_ptr + b * C * N + offs
    gib = gimg_ptr + b * C * N
    gfb = gflow_ptr + b * NDIM * N + offs
    if NEAREST:
        # The nearest sample is piecewise constant in the displacement: zero displacement gradient (as ATen).
        if NEED_FLOW:
            for a in tl.static_range(NDIM):
                tl.store(gfb + a * N, tl.zeros((BLOCK,), COMPUTE).to(gflow_ptr.dtype.element_ty), mask=pm)
        if NEED_IMG:
            jh, vh = _nearest_axis(hi, uh, H, BORDER, COMPUTE)
            jw, vw = _nearest_axis(wi, uw, W, BORDER, COMPUTE)
            dst = jh * W + jw
            m = pm & vh & vw
            if NDIM == 3:
                jd, vd = _nearest_axis(di, ud, D, BORDER, COMPUTE)
                dst += jd * H * W
                m = m & vd
            for _c in range(C):
                go = tl.load(gb, mask=pm, other=0.0).to(COMPUTE)
                tl.atomic_add(gib + dst, go, mask=m, sem="relaxed")
                gb += N
                gib += N
    else:
        h0, h1, wh0, wh1, vh0, vh1, gmh = _linear_axis(hi, uh, H, BORDER, COMPUTE)
        w0, w1, ww0, ww1, vw0, vw1, gmw = _linear_axis(wi, uw, W, BORDER, COMPUTE)
        if NDIM == 3:
            d0, d1, wd0, wd1, vd0, vd1, gmd = _linear_axis(di, ud, D, BORDER, COMPUTE)
        else:
            d0, d1, wd0, wd1, vd0, vd1, gmd = di, di, 1.0, 0.0, pm, pm, 0.0
        # d out / d coord per axis, summed over channels with the upstream gradient.
        gd = tl.zeros((BLOCK,), COMPUTE)
        gh = tl.zeros((BLOCK,), COMPUTE)
        gw = tl.zeros((BLOCK,), COMPUTE)
        for _c in range(C):
            go = tl.load(gb, mask=pm, other=0.0).to(COMPUTE)
            cb = ib
            gcb = gib
            for kd in tl.static_range(NDIM - 1):
                for kh in tl.static_range(2):
                    for kw in tl.static_range(2):
                        m = pm & _pick(kd, vd0, vd1) & _pick(kh, vh0, vh1) & _pick(kw, vw0, vw1)
                        wd = _pick(kd, wd0, wd1)
                        wh = _pick(kh, wh0, wh1)
                        ww = _pick(kw, ww0, ww1)
                        if NEED_FLOW:
                            off = (_pick(kd, d0, d1) * s_id + _pick(kh, h0, h1) * s_ih + _pick(kw, w0, w1) * s_iw)
                            gv = go * tl.load(cb + off, mask=m, other=0.0).to(COMPUTE)
                            # d w1 / dx = +1, d w0 / dx = -1 along each axis.
                            gw += gv * (wd * wh * (2 * kw - 1))
                            gh += gv * (wd * ww * (2 * kh - 1))
                            if NDIM == 3:
                                gd += gv * (wh * ww * (2 * kd - 1))
                        if NEED_IMG:
                            dst = (_pick(kd, d0, d1) * H + _pick(kh, h0, h1)) * W + _pick(kw, w0, w1)
                            # relaxed: only the final sums matter, no ordering between lanes is needed.
                            tl.atomic_add(gcb + dst, go * (wd * wh * ww), mask=m, sem="relaxed")
            ib += s_ic
            gb += N
            gib += N
        if NEED_FLOW and SELF:
            # Atomics too: other programs' image-role scatter lands in the same buffer at the same time.
            gs = gout_ptr + b * C * N + offs
            gis = gimg_ptr + b * C * N + offs
            if NDIM == 3:
                tl.atomic_add(gis, tl.load(gs, mask=pm, other=0.0).to(COMPUTE) + gd * gmd, mask=pm, sem="relaxed")
            tl.atomic_add(gis + (NDIM - 2) * N, tl.load(gs + (NDIM - 2) * N, mask=pm, other=0.0).to(COMPUTE)
                          + gh * gmh, mask=pm, sem="relaxed")
            tl.atomic_add(gis + (NDIM - 1) * N, tl.load(gs + (NDIM - 1) * N, mask=pm, other=0.0).to(COMPUTE)
                          + gw * gmw, mask=pm, sem="relaxed")
        elif NEED_FLOW:
            ety = gflow_ptr.dtype.element_ty
            if NDIM == 3:
                tl.store(gfb, cast_out(gd * gmd, ety, EMULATE_RTNE), mask=pm)
                tl.store(gfb + N, cast_out(gh * gmh, ety, EMULATE_RTNE), mask=pm)
                tl.store(gfb + 2 * N, cast_out(gw * gmw, ety, EMULATE_RTNE), mask=pm)
            else:
                tl.store(gfb, cast_out(gh * gmh, ety, EMULATE_RTNE), mask=pm)
                tl.store(gfb + N, cast_out(gw * gmw, ety, EMULATE_RTNE), mask=pm)


@triton.jit
def _warp_corners_kernel(flow_ptr, key_ptr, wt_ptr, D, H, W, s_fb, s_fc, s_fd, s_fh, s_fw, sentinel,
                         NDIM: tl.constexpr, BORDER: tl.constexpr, NEAREST: tl.constexpr,
                         COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic image gradient, step 1: for entry e = (b*N + p)*K + k (K corners per voxel) write the
    destination b*N + q of corner k, or `sentinel` (= B*N, sorts last) where zeros padding drops it."""
    b, N, offs, pm, di, hi, wi, foff = _voxel_setup(D, H, W, s_fb, s_fd, s_fh, s_fw, BLOCK)
    # Loaded here, not in a helper taking flow_ptr (see _voxel_setup); 2D: the depth load is masked off (ud = 0).
    ud = tl.load(flow_ptr + foff, mask=pm & (NDIM == 3), other=0.0).to(COMPUTE)
    uh = tl.load(flow_ptr + foff + (NDIM - 2) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    uw = tl.load(flow_ptr + foff + (NDIM - 1) * s_fc, mask=pm, other=0.0).to(COMPUTE)
    src = b * N + offs  # int64 global voxel id
    if NEAREST:
        jh, vh = _nearest_axis(hi, uh, H, BORDER, COMPUTE)
        jw, vw = _nearest_axis(wi, uw, W, BORDER, COMPUTE)
        dst = jh * W + jw
        m = vh & vw
        if NDIM == 3:
            jd, vd = _nearest_axis(di, ud, D, BORDER, COMPUTE)
            dst += jd * H * W
            m = m & vd
        tl.store(key_ptr + src, tl.where(m, b * N + dst, sentinel), mask=pm)
        tl.store(wt_ptr + src, tl.full((BLOCK,), 1.0, COMPUTE), mask=pm)
    else:
        h0, h1, wh0, wh1, vh0, vh1, _gh = _linear_axis(hi, uh, H, BORDER, COMPUTE)
        w0, w1, ww0, ww1, vw0, vw1, _gw = _linear_axis(wi, uw, W, BORDER, COMPUTE)
        if NDIM == 3:
            d0, d1, wd0, wd1, vd0, vd1, _gd = _linear_axis(di, ud, D, BORDER, COMPUTE)
        else:
            d0, d1, wd0, wd1, vd0, vd1 = di, di, 1.0, 0.0, pm, pm
        for kd in tl.static_range(NDIM - 1):
            for kh in tl.static_range(2):
                for kw in tl.static_range(2):
                    e = src * (4 * (NDIM - 1)) + (kd * 4 + kh * 2 + kw)  # entry id, corners of a voxel adjacent
                    m = _pick(kd, vd0, vd1) & _pick(kh, vh0, vh1) & _pick(kw, vw0, vw1)
                    dst = (_pick(kd, d0, d1) * H + _pick(kh, h0, h1)) * W + _pick(kw, w0, w1)
                    wgt = _pick(kd, wd0, wd1) * _pick(kh, wh0, wh1) * _pick(kw, ww0, ww1)
                    tl.store(key_ptr + e, tl.where(m, b * N + dst, sentinel), mask=pm)
                    tl.store(wt_ptr + e, wgt, mask=pm)


@triton.jit
def _warp_gather_kernel(gout_ptr, start_ptr, perm_ptr, wt_ptr, gimg_ptr, C, N, total, K: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic image gradient, step 2: destination q sums its sorted group [start[q], start[q+1]) in order."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    qm = q < total
    s = tl.load(start_ptr + q, mask=qm, other=0)
    n = tl.where(qm, tl.load(start_ptr + q + 1, mask=qm, other=0) - s, 0)
    nmax = tl.max(n, axis=0)
    b = q // N
    for c in range(C):
        # (b*N + p) -> b*C*N + c*N + p in the contiguous (B, C, N) gradient. Factored so that N multiplies the
        # int64 b-term, never the int32 c alone: torch <= 2.11's mutation analysis bakes N in as a constant, and
        # c * 2**31 overflowed int32 there (it then gave up: every input "written"); launches pass N as int64.
        coff = (b * (C - 1) + c) * N
        acc = tl.zeros((BLOCK,), COMPUTE)
        for j in range(0, nmax):
            m = j < n
            e = tl.load(perm_ptr + s + j, mask=m, other=0)
            go = tl.load(gout_ptr + coff + e // K, mask=m, other=0.0).to(COMPUTE)
            acc += tl.where(m, go * tl.load(wt_ptr + e, mask=m, other=0.0), 0.0)
        tl.store(gimg_ptr + coff + q, acc.to(gimg_ptr.dtype.element_ty), mask=qm)


declare_writes(_warp_fwd_kernel, lambda kw: ["out_ptr"])
# SELF accumulates the whole step gradient into gimg and never touches gflow (a placeholder then).
declare_writes(_warp_bwd_kernel, lambda kw: ["gimg_ptr"] * bool(kw["NEED_IMG"] or kw["SELF"])
               + ["gflow_ptr"] * bool(kw["NEED_FLOW"] and not kw["SELF"]))
declare_writes(_warp_corners_kernel, lambda kw: ["key_ptr", "wt_ptr"])
declare_writes(_warp_gather_kernel, lambda kw: ["gimg_ptr"])


# ----------------------------------------------------------------------------------------------------------------
# Launchers (checks, allocation, grid, launch; no autograd)
# ----------------------------------------------------------------------------------------------------------------
def _check(image: torch.Tensor, flow: torch.Tensor, mode: str, padding: str) -> int:
    nsp = check_warp_inputs(image, flow, mode, padding)
    if image.is_floating_point() and image.dtype != flow.dtype:
        raise ValueError(f"image and flow must have the same dtype on the Triton path, got {image.dtype} and "
                         f"{flow.dtype}")
    check_launch_device("image", image)
    return nsp


def _spatial(image: torch.Tensor, nsp: int) -> tuple[int, int, int]:
    return (1, *image.shape[2:]) if nsp == 2 else tuple(image.shape[2:])


def _strides(t: torch.Tensor, nsp: int) -> list[int]:
    s = list(t.stride())
    return [s[0], s[1], 0, s[2], s[3]] if nsp == 2 else s


def _compute(flow: torch.Tensor):
    return tl.float64 if flow.dtype == torch.float64 else tl.float32


def warp_fwd(image: torch.Tensor, flow: torch.Tensor, mode: str = "linear", padding: str = "border",
             add_self: bool = False) -> torch.Tensor:
    """Forward launcher: image (B, C, *S) [strided ok], flow (B, ndim, *S) voxels -> contiguous (B, C, *S).

    add_self=True returns image + warp(image, flow) (the scaling-and-squaring step, with image = flow).
    Integer images (nearest only) are copied bit-exactly in their dtype.
    """
    return _launch_fwd(image, flow, _check(image, flow, mode, padding), mode, padding, add_self)


def _launch_fwd(image: torch.Tensor, flow: torch.Tensor, nsp: int, mode: str, padding: str,
                add_self: bool) -> torch.Tensor:
    """warp_fwd after its checks (the integration loop checks once, then launches 7 times: ~10 us of checks saved
    per step, benchmarks/launch_cost.py)."""
    D, H, W = _spatial(image, nsp)
    B, C = image.shape[:2]
    src = image.view(torch.uint8) if image.dtype == torch.bool else image
    out = torch.empty(image.shape, device=image.device, dtype=src.dtype)
    grid = (cdiv(D * H * W, BLOCK), B)
    launch(_warp_fwd_kernel, grid, src, flow, out, C, D, H, W, *_strides(src, nsp), *_strides(flow, nsp),
           NDIM=nsp, BORDER=padding == "border", NEAREST=mode == "nearest", ADD_SELF=add_self,
           COMPUTE=_compute(flow), BLOCK=BLOCK, EMULATE_RTNE=emulate_rtne(_warp_fwd_kernel, out.dtype))
    return out.view(torch.bool) if image.dtype == torch.bool else out


def _grad_image_deterministic(grad_out, flow, nsp, D, H, W, C, mode, padding, acc):
    B = flow.shape[0]
    N = D * H * W
    K = 1 if mode == "nearest" else 2**nsp
    keys = torch.empty(B * N * K, device=flow.device, dtype=torch.int64)
    wts = torch.empty(B * N * K, device=flow.device, dtype=acc)
    launch(_warp_corners_kernel, (cdiv(N, BLOCK), B), flow, keys, wts, D, H, W, *_strides(flow, nsp), B * N,
           NDIM=nsp, BORDER=padding == "border", NEAREST=mode == "nearest", COMPUTE=_compute(flow), BLOCK=BLOCK)
    # stable=True: inside a destination's group, entries keep their (voxel, corner) order -> a fixed summation order.
    sorted_keys, perm = torch.sort(keys, stable=True)
    start = torch.searchsorted(sorted_keys, torch.arange(B * N + 1, device=flow.device, dtype=torch.int64))
    gimg = torch.empty((B, C, D, H, W), device=flow.device, dtype=acc)
    launch(_warp_gather_kernel, (cdiv(B * N, BLOCK_GATHER),), grad_out, start, perm, wts, gimg, C, N, B * N,
           K=K, COMPUTE=_compute(flow), BLOCK=BLOCK_GATHER)
    return gimg


def _launch_bwd(grad_out, src, flow, gimg, gflow, nsp, mode, padding, self_step):
    D, H, W = _spatial(src, nsp)
    B, C = src.shape[:2]
    # 0-element stand-in for an output the launch does not write (NEED_* pruned): never an input, so
    # wrap_triton's mutation analysis cannot take an input for an output.
    placeholder = torch.empty(0, device=flow.device, dtype=acc_dtype(flow.dtype))
    launch(_warp_bwd_kernel, (cdiv(D * H * W, BLOCK), B), grad_out, src, flow,
           placeholder if gimg is None else gimg, placeholder if gflow is None else gflow, C, D, H, W,
           *_strides(src, nsp), *_strides(flow, nsp),
           NDIM=nsp, BORDER=padding == "border", NEAREST=mode == "nearest",
           NEED_IMG=gimg is not None, NEED_FLOW=self_step or gflow is not None, SELF=self_step,
           COMPUTE=_compute(flow), BLOCK=BLOCK, EMULATE_RTNE=emulate_rtne(_warp_bwd_kernel, flow.dtype),
           num_warps=BWD_WARPS)


def warp_self_bwd(grad: torch.Tensor, u: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Backward of one scaling-and-squaring step v = u + warp(u, u) (`warp_fwd(u, u, add_self=True)`).

    grad (B, ndim, *S) = d loss / d v (any float dtype) -> d loss / d u, (B, ndim, *S) contiguous in the
    accumulation dtype (fp32; fp64 for an fp64 u). ONE launch into one zero-filled buffer, where `warp_bwd` +
    two additions wrote a displacement-gradient temporary and read/wrote the running sum twice per step.
    """
    nsp = _check(u, u, "linear", padding)
    if tuple(grad.shape) != tuple(u.shape):
        raise ValueError(f"grad must have the field's shape {tuple(u.shape)}, got {tuple(grad.shape)}")
    return _launch_self_bwd(grad, u, nsp, padding)


def _launch_self_bwd(grad: torch.Tensor, u: torch.Tensor, nsp: int, padding: str) -> torch.Tensor:
    """warp_self_bwd after its checks (the integration's backward checks once for its 7 steps)."""
    out = torch.zeros(u.shape, device=u.device, dtype=acc_dtype(u.dtype))
    _launch_bwd(grad.contiguous(), u, u, out, None, nsp, "linear", padding, self_step=True)
    return out


def warp_bwd(grad_out: torch.Tensor, image: torch.Tensor, flow: torch.Tensor, mode: str = "linear",
             padding: str = "border", need_image: bool = True, need_flow: bool = True,
             deterministic: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher -> (grad_image (B, C, *S) in image dtype or None, grad_flow (B, ndim, *S) or None).

    need_image=False skips the scatter and its buffer entirely. deterministic=True computes grad_image with no
    atomics (sort + ordered gather; bitwise reproducible).
    """
    nsp = _check(image, flow, mode, padding)
    if tuple(grad_out.shape) != tuple(image.shape):
        raise ValueError(f"grad_out must have the image's shape {tuple(image.shape)}, got {tuple(grad_out.shape)}")
    if need_image and not image.is_floating_point():
        raise ValueError(f"an integer image ({image.dtype}) has no gradient; call with need_image=False")
    D, H, W = _spatial(image, nsp)
    B, C = image.shape[:2]
    acc = acc_dtype(flow.dtype)
    grad_out = grad_out.contiguous()
    src = image.view(torch.uint8) if image.dtype == torch.bool else image
    gflow = torch.empty(flow.shape, device=flow.device, dtype=flow.dtype) if need_flow else None
    atomic_img = need_image and not deterministic
    gimg = torch.zeros(image.shape, device=image.device, dtype=acc) if atomic_img else None
    if need_flow or atomic_img:
        _launch_bwd(grad_out, src, flow, gimg, gflow, nsp, mode, padding, self_step=False)
    if need_image and deterministic:
        gimg = _grad_image_deterministic(grad_out, flow, nsp, D, H, W, C, mode, padding, acc).view(image.shape)
    if gimg is not None and gimg.dtype != image.dtype:
        gimg = gimg.to(image.dtype)
    return gimg, gflow


# ----------------------------------------------------------------------------------------------------------------
# Autograd + public function
# ----------------------------------------------------------------------------------------------------------------
class WarpFunction(torch.autograd.Function):
    """apply(image, flow, mode, padding, deterministic). Saves image and flow; the backward recomputes corners."""

    @staticmethod
    def forward(ctx, image, flow, mode, padding, deterministic):
        ctx.mode, ctx.padding, ctx.deterministic = mode, padding, deterministic
        ctx.save_for_backward(image, flow)
        return warp_fwd(image, flow, mode, padding)

    @staticmethod
    def backward(ctx, grad_out):
        image, flow = ctx.saved_tensors
        need_image, need_flow = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gi, gf = warp_bwd(grad_out, image, flow, ctx.mode, ctx.padding, need_image, need_flow, ctx.deterministic)
        return gi, gf, None, None, None


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "linear", padding: str = "border",
         deterministic: bool = False) -> torch.Tensor:
    """Warp on the Triton kernels (eager path; contract of `reference.warp`): out(p) = image(p + flow(p)).

    image (B, C, H, W) / (B, C, D, H, W), float (same dtype as flow) or integer labels with mode="nearest";
    flow (B, ndim, *S) voxels. deterministic=True: bitwise-reproducible image gradient (no atomics).
    Unlike the reference, inputs are not scanned for NaN (a full extra read and a host sync per call).
    """
    check_choice("mode", mode, ("linear", "nearest"))
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    return WarpFunction.apply(image, flow, mode, padding, deterministic)

