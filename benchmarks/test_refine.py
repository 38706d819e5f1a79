"""Instance optimisation (deepsim_rt.refine): one refinement iteration and a full coarse-to-fine refinement.

iteration = one Adam step at full resolution: warp(moving, u) -> similarity (+ diffusion) -> backward (flow
            gradient only: the images are data) -> Adam update (`deepsim_rt.refine.optimize.level_step`).
full      = `refine(moving, fixed, init, config)`: 3 levels x ITERS steps (the loss checks included).
Providers:
  "reference"  eager, the reference ops (every deepsim_rt module's hot ops swapped to kernels.reference)
  "compile"    the same reference loop with the loss torch.compile'd (RefineConfig(compile=True); compile time
               is warm-up, untimed, and recorded as extra_info["setup_s"])
  "deepsim_rt" the public ops, i.e. the fused Triton kernels on CUDA (on a CPU they ARE the reference: GPU only)
Losses: ncc (the measured default) and deepsim_seg (a random-weight `paper`-preset extractor on the GPU, `small` on
the CPU: the cost does not depend on the weights). GPU goal (issue #10): deepsim_rt >= 3x reference and >= 1.5x
compile per iteration (report.py's kernel table shows both ratios: the provider names are the kernel suite's).
Sizes: GPU 3D 160x192x224 and 2D 256x256 (the issue's); CPU the bundled grids 40x48x40 and 96x80 (`make bench`
minutes).
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.harness import bench_device, shape_str, use_provider

DEV = bench_device()
ON_GPU = DEV.type == "cuda"
PROVIDERS = ("reference", "compile", "deepsim_rt")
LOSSES = ("ncc", "deepsim_seg")
SIZES = {"cuda": ((160, 192, 224), (256, 256)), "cpu": ((40, 48, 40), (96, 80))}
FULL_ITERS = {"cuda": 20, "cpu": 10}  # steps per level of the "full" case (the default is 25-50: time per step)


def _cases(kind: str) -> list:
    out = []
    for spatial in SIZES[DEV.type]:  # 3D first: a time box cuts the 2D tail
        for loss in LOSSES:
            for prov in PROVIDERS:
                # On the CPU, compile only the small 2D ncc case (Inductor's C++ compile of a 3D loss takes
                # minutes on 2 shared cores); deepsim_rt is the reference there.
                if not ON_GPU and prov == "compile" and (len(spatial) == 3 or loss != "ncc" or kind == "full"):
                    continue
                marks = [pytest.mark.gpu] if (ON_GPU or prov == "deepsim_rt") else []
                out.append(pytest.param(spatial, loss, prov, marks=marks,
                                        id=f"{len(spatial)}d-{shape_str(spatial)}-{loss}-{prov}"))
    return out


def _images(spatial: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A smooth moving image, the fixed image = moving under a known smooth deformation, a start field (random
    smooth, 1-voxel scale, like a network's): float32 on DEV."""
    import torch.nn.functional as F

    from deepsim_rt.kernels import warp

    g = torch.Generator().manual_seed(0)
    nd = len(spatial)
    coarse = tuple(max(2, s // 16) for s in spatial)
    mode = "bilinear" if nd == 2 else "trilinear"
    moving = F.interpolate(torch.rand((1, 1, *coarse), generator=g), size=spatial, mode=mode, align_corners=False)
    u_true = 3.0 * F.interpolate(torch.randn((1, nd, *coarse), generator=g), size=spatial, mode=mode,
                                 align_corners=False)
    fixed = warp(moving, u_true)
    init = 0.5 * u_true
    return moving.to(DEV), fixed.to(DEV), init.to(DEV)


def _config(loss: str, provider: str, iterations: int):
    from deepsim_rt.refine import RefineConfig

    return RefineConfig(iterations=iterations, loss=loss, levels=3, compile=provider == "compile", progress=False,
                        threads=0)  # threads: BENCH_THREADS decides (harness)


def _extractor(loss: str, nd: int):
    if not loss.startswith("deepsim_"):
        return None
    from deepsim_rt.nn import NetConfig, SegNet

    torch.manual_seed(0)
    return SegNet(NetConfig.make("seg", nd, "paper" if ON_GPU else "small", n_classes=7)).to(DEV)


def _provider(provider: str) -> str:
    return "kernels" if provider == "deepsim_rt" else "reference"


@pytest.mark.parametrize("spatial,loss,provider", _cases("iteration"))
def test_refine_iteration(bench, spatial, loss, provider):
    if provider == "deepsim_rt" and not ON_GPU:
        pytest.skip("on the CPU the public ops ARE the reference")
    from deepsim_rt.losses import DeepSimLoss
    from deepsim_rt.refine.optimize import level_similarity, level_step

    moving, fixed, init = _images(spatial)
    cfg = _config(loss, provider, 1).resolve(len(spatial))
    ext = _extractor(loss, len(spatial))
    deepsim = DeepSimLoss(ext, name=loss) if ext is not None else None
    with use_provider(_provider(provider)):
        param = torch.zeros_like(init).requires_grad_(True)
        step = level_step(cfg, init, param, moving, fixed, level_similarity(cfg, fixed, deepsim))
        t0 = time.perf_counter()
        step()  # compile (if any) happens here, untimed
        setup = time.perf_counter() - t0
        bench.run(step, lambda: (), op=f"refine{len(spatial)}d-{loss}", pass_="iteration", provider=provider,
                  shape=shape_str((1, 1, *spatial)), dtype="float32", rotate=False,
                  extra={"loss": loss, "lam": cfg.lam, "setup_s": setup})


@pytest.mark.parametrize("spatial,loss,provider", _cases("full"))
def test_refine_full(bench, spatial, loss, provider):
    if provider == "deepsim_rt" and not ON_GPU:
        pytest.skip("on the CPU the public ops ARE the reference")
    from deepsim_rt.refine import refine

    moving, fixed, init = _images(spatial)
    iters = FULL_ITERS[DEV.type]
    cfg = _config(loss, provider, iters)
    ext = _extractor(loss, len(spatial))
    with use_provider(_provider(provider)):
        t0 = time.perf_counter()
        refine(moving, fixed, init, cfg, extractor=ext)  # compile (if any) per level size, untimed
        setup = time.perf_counter() - t0
        bench.run(lambda: refine(moving, fixed, init, cfg, extractor=ext), lambda: (),
                  op=f"refine{len(spatial)}d-{loss}", pass_=f"full-3x{iters}", provider=provider,
                  shape=shape_str((1, 1, *spatial)), dtype="float32", rotate=False,
                  extra={"loss": loss, "levels": 3, "iterations_per_level": iters, "setup_s": setup})
