"""The refinement loop: Adam on a displacement (or stationary velocity), coarse to fine.

    res = refine(moving, fixed, init=u_net, config=RefineConfig(iterations=50, loss="ncc"))
    res.displacement            # (B, ndim, *S), voxels, warped(p) = moving(p + u(p))

Every step is the public ops of deepsim_rt.kernels (CUDA -> fused Triton kernels: warp backward with the flow
gradient only, since the images need none; integrate on the warp kernel; DeepSim's multi-level cosine forward and
backward in one launch each; CPU -> the PyTorch reference). The loop never reads a value back to the host between
checks: the loss of every step is copied into a device buffer, and the buffer is read every `check_every` steps
(finite check, tolerance) -- on CUDA these are the loop's only synchronisations. With `cuda_graph=True` one step
(forward, backward, Adam) is captured per level and replayed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deepsim_rt._checks import check_displacement, check_same_device
from deepsim_rt.kernels import integrate, multilayer_cosine, warp
from deepsim_rt.losses import DeepSimLoss
from deepsim_rt.losses._inputs import check_image_pair
from deepsim_rt.losses.multimodal import nmi_loss
from deepsim_rt.refine.config import RefineConfig
from deepsim_rt.refine.pyramid import bending_energy, downsample_image, level_sizes, resample_field
from deepsim_rt.refine.terms import FixedMIND, FixedNCC, diffusion_term, masked_mean, mse_term
from deepsim_rt.transforms.pad import pad_to_multiple

__all__ = ["refine", "RefineResult", "NonFiniteLossError", "load_extractor", "model_extractor", "level_step",
           "level_similarity"]

WARMUP_STEPS = 3  # CUDA graph: steps run eagerly on a side stream before capture (they count towards the budget)


class NonFiniteLossError(ValueError):
    """The refinement loss became NaN or Inf (a ValueError: the CLI reports it as one line, nothing is written)."""


@dataclass
class RefineResult:
    """displacement: (B, ndim, *S) voxels (float32 unless the inputs were fp64); velocity: the optimised velocity
    (diffeomorphic) else None; losses: per level (coarsest first) the loss of every step run, on the CPU;
    iterations: steps run per level; sizes: spatial size per level; seconds: wall time."""

    displacement: torch.Tensor
    velocity: torch.Tensor | None
    losses: list[torch.Tensor] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    sizes: list[tuple[int, ...]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------------------------------------------
def load_extractor(extractor: nn.Module | str | os.PathLike, loss: str) -> nn.Module:
    """An nn.Module with extract_features, or a feature checkpoint path (kind seg/ae) loaded on the CPU."""
    if isinstance(extractor, nn.Module):
        return extractor
    from deepsim_rt.nn import load_model

    path = Path(extractor)
    if not path.is_file():
        raise ValueError(f"refine loss {loss}: extractor file not found: {str(path)!r}")
    model = load_model(path)
    if not callable(getattr(model, "extract_features", None)):
        raise ValueError(f"refine loss {loss}: {str(path)!r} is a {model.cfg.kind} model; a DeepSim loss needs a "
                         "feature extractor (seg or ae)")
    return model


def model_extractor(model_path: str | os.PathLike | None, loss: str) -> Path | None:
    """The extractor bundled with a registration model: seg.safetensors / ae.safetensors in the model's folder
    (deepsim_rt/weights/<name>/ layout), or None when there is none (or the loss is not a DeepSim loss)."""
    if model_path is None or not loss.startswith("deepsim_"):
        return None
    path = Path(model_path).parent / f"{loss.split('_', 1)[1]}.safetensors"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# Similarity per level
# ----------------------------------------------------------------------------------------------------------------
def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return pad_to_multiple(x, multiple, "replicate")[0] if multiple > 1 else x


def level_similarity(cfg: RefineConfig, fixed: torch.Tensor, deepsim: DeepSimLoss | None,
                     mask: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """warped (B, C, *S) -> 0-dim similarity loss against `fixed` of this level (its features computed once).
    mask: (B, 1, *S) weights in [0, 1] on this level's grid, or None: the similarity counts those voxels only
    (DeepSim: each feature level's cosine map weighted by the mask averaged down to that level)."""
    if cfg.loss == "ncc":
        return FixedNCC(fixed, cfg.ncc_window, mask=mask)
    if cfg.loss == "mse":
        return lambda warped: mse_term(warped, fixed, mask)
    if cfg.loss == "mind":
        return FixedMIND(fixed, mask=mask)
    if cfg.loss == "nmi":
        if mask is not None:
            raise ValueError("refine loss nmi compares whole-image histograms and takes no mask; use ncc, mse, mind "
                             "or deepsim_* with --fixed-mask / --moving-mask")
        return lambda warped: nmi_loss(warped, fixed)
    # DeepSim: the extractors take sizes that are multiples of 2**stages; replicate-pad both images (the padded
    # rim is where `border` warping puts the edge voxels anyway).
    multiple = getattr(getattr(deepsim.extractor, "cfg", None), "spatial_multiple", 1)
    with torch.no_grad():
        fixed_feats = [f.detach() for f in deepsim.extractor.extract_features(_pad_to(fixed, multiple))]

    if mask is not None:
        padded = _pad_to(mask, multiple)
        masks = [downsample_image(padded, tuple(f.shape[2:])) for f in fixed_feats]

    def sim(warped: torch.Tensor) -> torch.Tensor:
        feats = deepsim.extractor.extract_features(_pad_to(warped, multiple))
        if mask is None:
            return 1.0 - multilayer_cosine(feats, fixed_feats, eps=deepsim.eps, reduction="mean")
        maps = multilayer_cosine(feats, fixed_feats, eps=deepsim.eps, reduction="none")
        return 1.0 - sum(masked_mean(c[:, None], m) for c, m in zip(maps, masks, strict=True)) / len(maps)

    return sim


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != old:
            torch.set_num_threads(old)


def _check_inputs(moving: torch.Tensor, fixed: torch.Tensor, init: torch.Tensor | None) -> int:
    nd = check_image_pair(("moving", "fixed"), moving, fixed)
    if init is not None:
        check_displacement("init", init)
        want = (moving.shape[0], nd, *moving.shape[2:])
        if tuple(init.shape) != want:
            raise ValueError(f"init displacement must be (B, ndim, *S) = {want}, got {tuple(init.shape)}")
        check_same_device(("moving", "init"), moving, init)
    return nd


def refine(moving: torch.Tensor, fixed: torch.Tensor, init: torch.Tensor | None = None,
           config: RefineConfig | None = None, extractor: nn.Module | str | os.PathLike | None = None,
           mask: torch.Tensor | None = None) -> RefineResult:
    """Refine the displacement of moving -> fixed by Adam, coarse to fine (see RefineConfig for the loss).

    moving, fixed: float (B, C, *S), same shape and device, intensities as the similarity expects (the runtime
    passes min-max normalised [0, 1] images). init: (B, ndim, *S) voxel displacement to start from (a network's),
    None = zero. With diffeomorphic=True the velocity starts at init (exp(v) ~ id + v, first order).
    extractor: DeepSim feature model (overrides config.extractor); required for deepsim_seg / deepsim_ae.
    mask: (B, 1, *S) on the fixed grid, non-zero = inside (a brain mask), or None: the similarity counts the
    voxels inside only (the regulariser still covers the whole field). ValueError when it is empty.
    Raises ValueError for bad options, a pyramid axis below 4 voxels, or a non-finite loss (NonFiniteLossError,
    naming level and iteration).
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else RefineConfig()
    if not isinstance(cfg, RefineConfig):
        raise ValueError(f"config must be a RefineConfig, got {type(cfg).__name__}")
    nd = _check_inputs(moving, fixed, init)
    cfg = cfg.resolve(nd)
    if mask is not None:
        want = (fixed.shape[0], 1, *fixed.shape[2:])
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
            raise ValueError(f"mask must be a (B, 1, *S) = {want} tensor, got "
                             f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
        mask = (mask != 0).to(fixed.device, torch.float64 if fixed.dtype == torch.float64 else torch.float32)
        if not bool(mask.flatten(1).sum(1).gt(0).all()):
            raise ValueError("mask is empty (no voxel inside): the similarity would have nothing to compare")
    deepsim = None
    if cfg.needs_extractor:
        ext = extractor if extractor is not None else cfg.extractor
        if ext is None:
            raise ValueError(f"refine loss {cfg.loss} needs a feature extractor (the model's bundled "
                             f"{cfg.loss.split('_', 1)[1]}.safetensors, or extractor=/--refine-extractor), got none")
        deepsim = DeepSimLoss(load_extractor(ext, cfg.loss).to(moving.device), name=cfg.loss)
    sizes = level_sizes(tuple(moving.shape[2:]), cfg.levels)
    acc = torch.float64 if moving.dtype == torch.float64 else torch.float32
    moving, fixed = moving.to(acc), fixed.to(acc)
    start = torch.zeros((moving.shape[0], nd, *moving.shape[2:]), dtype=acc, device=moving.device) \
        if init is None else init.detach().to(acc).clone()
    result = RefineResult(displacement=start, velocity=None)
    bar = _progress(cfg, len(sizes) * cfg.iterations)
    with _threads(cfg.threads), torch.random.fork_rng(devices=[]), torch.inference_mode(False), \
            torch.enable_grad():
        torch.manual_seed(cfg.seed)
        # The optimised variable is a correction on top of the start field: level k works on
        # resample(start) + delta_k, and delta_k is upsampled to the next level. The start field itself is never
        # blurred by the pyramid: the network's fine detail survives the coarse levels.
        delta = None
        for k, size in enumerate(sizes):
            base = resample_field(start, size) if init is not None else None
            delta = torch.zeros((start.shape[0], nd, *size), dtype=acc, device=start.device) if delta is None \
                else resample_field(delta, size)
            # DeepSim compares features of the full-resolution images at every level (the extractor was trained
            # at that resolution; on 4x-downsampled images its features are off-distribution: measured 2D Dice
            # 0.818 with an image pyramid vs 0.840 at full resolution only): its coarse levels optimise a coarse
            # field, upsampled to warp the full-resolution image. NCC / MSE use the image pyramid (cheap levels).
            img_size = tuple(moving.shape[2:]) if deepsim is not None else size
            mov_k, fix_k = downsample_image(moving, img_size), downsample_image(fixed, img_size)
            mask_k = None if mask is None else downsample_image(mask, img_size)
            # 0 iterations: nothing is compared (the NCC sums of a 256^3 level cost 1.4 s each for nothing)
            sim = level_similarity(cfg, fix_k, deepsim, mask_k) if cfg.iterations else None
            delta, losses = _run_level(cfg, base, delta, mov_k, fix_k, sim, k, len(sizes), bar)
            result.losses.append(losses)
            result.iterations.append(len(losses))
            result.sizes.append(size)
        with torch.no_grad():
            field_ = delta if init is None else start + delta
            if cfg.diffeomorphic:
                result.velocity = field_
                result.displacement = integrate(field_, steps=cfg.integrate_steps, padding=cfg.padding)
            else:
                result.displacement = field_
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t_start
    return result


def _progress(cfg: RefineConfig, total: int):
    if not cfg.progress or not sys.stderr.isatty() or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refine", unit="step", leave=False)


def level_step(cfg: RefineConfig, base: torch.Tensor | None, param: torch.Tensor, mov: torch.Tensor,
               fix: torch.Tensor, similarity: Callable[[torch.Tensor], torch.Tensor], capturable: bool = False
               ) -> Callable[[], torch.Tensor]:
    """One Adam step on one level as a closure: -> step() returning the loss before the step (0-dim, on device).

    The field is base + param (base None = 0); param: leaf tensor (B, ndim, *S) with requires_grad. With
    cfg.compile the loss (warp, similarity, regularisers; backward via AOTAutograd) is torch.compile'd.
    capturable: Adam's capturable state (CUDA graphs). Also what benchmarks/test_refine.py times per iteration.
    """
    opt = torch.optim.Adam([param], lr=cfg.lr, capturable=capturable)

    def loss_fn() -> torch.Tensor:
        p = param if base is None else base + param
        u = integrate(p, steps=cfg.integrate_steps, padding=cfg.padding) if cfg.diffeomorphic else p
        if u.shape[2:] != mov.shape[2:]:
            u = resample_field(u, tuple(mov.shape[2:]))
        total = similarity(warp(mov, u, mode="linear", padding=cfg.padding))
        if cfg.lam:
            total = total + cfg.lam * diffusion_term(p)
        if cfg.bending:
            total = total + cfg.bending * bending_energy(p)
        return total

    loss_of = torch.compile(loss_fn, dynamic=False) if cfg.compile else loss_fn

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=not capturable)
        loss = loss_of()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _run_level(cfg: RefineConfig, base: torch.Tensor | None, init: torch.Tensor, mov: torch.Tensor,
               fix: torch.Tensor, similarity: Callable[[torch.Tensor], torch.Tensor], level: int, n_levels: int, bar
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on one level: the field is base + delta (base None = 0), delta starts at `init`; returns (optimised
    delta (detached), loss per step run (CPU))."""
    param = init.detach().clone().requires_grad_(True)
    n = cfg.iterations
    hist = torch.empty(n, dtype=param.dtype, device=param.device)
    if n == 0:
        return param.detach(), hist.cpu()
    graph = cfg.cuda_graph and param.device.type == "cuda"
    step = level_step(cfg, base, param, mov, fix, similarity, capturable=graph)
    run_step = _graph_step(step, param, min(WARMUP_STEPS, n)) if graph else None
    check_every = 1 if param.device.type == "cpu" else cfg.check_every
    done = 0
    prev = None
    for it in range(n):
        if run_step is not None:
            hist[it] = run_step(it)
        else:
            hist[it] = step()
        done = it + 1
        if bar is not None:
            bar.update(1)
        # On the CPU reading the loss costs nothing, and the reference ops refuse a NaN flow in the next step:
        # check every step there. On CUDA only every check_every steps (the loop's only host syncs).
        if done % check_every == 0 or done == n:
            window = hist[done - ((done - 1) % check_every) - 1:done].cpu()
            bad = (~torch.isfinite(window)).nonzero()
            if len(bad):
                i = done - len(window) + int(bad[0, 0]) + 1
                raise NonFiniteLossError(
                    f"refinement loss is {float(window[int(bad[0, 0])])} at level {level + 1}/{n_levels} (size "
                    f"{'x'.join(map(str, mov.shape[2:]))}), iteration {i}; lower the learning rate (lr {cfg.lr}) or "
                    "check the inputs")
            if done % cfg.check_every and done != n:
                continue
            last = float(window[-1])
            if cfg.tol > 0 and prev is not None and abs(prev - last) <= cfg.tol * max(abs(prev), 1e-12):
                break
            prev = last
    return param.detach(), hist[:done].cpu()


def _graph_step(step: Callable[[], torch.Tensor], param: torch.Tensor, warmup: int) -> Callable[[int], torch.Tensor]:
    """CUDA graph of one step. The first `warmup` steps run eagerly on a side stream (real steps: they allocate
    the gradient and the Adam state the graph reuses); the next call captures one step (capture does not run it)
    and replays it; later calls replay. Returns the step's loss (a static buffer: copy it before the next call)."""
    stream = torch.cuda.Stream(device=param.device)
    state: dict = {}

    main = torch.cuda.current_stream(param.device)

    def run(it: int) -> torch.Tensor:
        if it < warmup:
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                out = step()
            main.wait_stream(stream)  # the caller reads `out` on the main stream (no host sync: a stream wait)
            return out
        if "graph" not in state:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                state["loss"] = step()
            state["graph"] = g
        state["graph"].replay()
        return state["loss"]

    return run
