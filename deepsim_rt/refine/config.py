"""RefineConfig: the one source of truth for the refinement's options (API defaults and CLI defaults).

Fields left at None take the measured default of the data's dimensionality (`DEFAULTS`, resolved by
`RefineConfig.resolve(ndim)`); how those defaults were chosen is in benchmarks/RESULTS.md ("Instance optimisation").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RefineConfig", "REFINE_LOSSES", "DEFAULTS", "LAM_SCALE", "MIN_LEVEL_SIZE", "NO_MODEL", "MAX_ITERATIONS"]

REFINE_LOSSES = ("ncc", "mse", "deepsim_seg", "deepsim_ae", "mind", "nmi")
NO_MODEL = "none"  # the model name of pure optimisation from zero (`--model none --refine ITERS`): no network
# Adam steps per level: the measured defaults are 25; 10000 per level is hours on a CPU for a 1 mm volume, so a
# larger ITERS is a typo, refused before any work
MAX_ITERATIONS = 10_000
MIN_LEVEL_SIZE = 4  # voxels per axis at the coarsest level: below this a 3-tap difference has nothing to smooth

# Measured defaults per dimensionality (bundled test pairs, CPU, one thread; benchmarks/refine_quality.py).
#   iterations: Adam steps per pyramid level; lr: Adam step in voxels of the level; lam: diffusion weight.
# Chosen on the first 16 (2D) / 8 (3D) test pairs from the bundled networks' displacements: lam 4 beat 2 / 1 / 0.5
# (3D Dice fg 0.776 / 0.773 / 0.759 / 0.737; 2D equal Dice, less folding), 25 steps per level reach within 0.004 of
# 50 at half the time, lr 0.2 matched 0.1 with half the steps.
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"iterations": 25, "loss": "ncc", "lam": 4.0, "lr": 0.2},
    3: {"iterations": 25, "loss": "ncc", "lam": 4.0, "lr": 0.2},
}
# The default lam of the other losses, relative to NCC's. DeepSim: measured on 8 2D test pairs from the network
# (bundled seg extractor): lam 2 -> Dice fg 0.839, 4 -> 0.834, 0.5 (image pyramid) -> 0.818, network 0.825; ae
# takes seg's (not swept). MSE: the paper's brain-3D ratio to NCC (0.08), not swept.
# MIND-SSC / NMI (multimodal baselines, losses.multimodal): swept from zero on 8 synth-2d validation pairs (x1 / x0.2
# of NCC's lam): x0.2 -> Dice 0.403 (MIND) / 0.353 (NMI) at ~0.1 % folding (benchmarks/synth_eval.py, issue 19).
LAM_SCALE = {"ncc": 1.0, "mse": 0.08, "deepsim_seg": 0.5, "deepsim_ae": 0.5, "mind": 0.2, "nmi": 0.2}


def _h(text: str) -> dict:
    return {"help": text}


def _default_help(name: str) -> str:
    return "; ".join(f"{nd}D {DEFAULTS[nd][name]}" for nd in sorted(DEFAULTS))


@dataclass
class RefineConfig:
    """Instance optimisation of one pair (or a batch): Adam, coarse to fine, on a displacement or a velocity.

    loss = similarity(warp(moving, u), fixed) + lam * diffusion(p) + bending * bending_energy(p), p the optimised
    field (the displacement u, or the velocity v with u = exp(v) when diffeomorphic). Per level, Adam runs
    `iterations` steps or stops earlier when the loss changed by less than `tol` (relative) over the last
    `check_every` steps. None = the measured default of the data's dimensionality (DEFAULTS).
    """

    iterations: int | None = field(default=None, metadata=_h(f"Adam steps per pyramid level "
                                                             f"({_default_help('iterations')})"))
    loss: str | None = field(default=None, metadata=_h(f"similarity: {', '.join(REFINE_LOSSES)} "
                                                       f"({_default_help('loss')})"))
    lam: float | None = field(default=None, metadata=_h(f"diffusion regulariser weight ({_default_help('lam')} for "
                                                         "ncc; x0.08 mse, x0.5 deepsim_seg / deepsim_ae, "
                                                         "x0.2 mind / nmi)"))
    levels: int = field(default=3, metadata=_h("pyramid levels, each halving every axis (1: full resolution only)"))
    lr: float | None = field(default=None, metadata=_h(f"Adam learning rate, voxels of the level "
                                                       f"({_default_help('lr')})"))
    diffeomorphic: bool = field(default=False, metadata=_h("optimise a stationary velocity, integrated by scaling "
                                                           "and squaring (no folding)"))
    bending: float = field(default=0.0, metadata=_h("bending-energy weight (0: off)"))
    tol: float = field(default=0.0, metadata=_h("stop a level when the loss changes by less than this (relative) "
                                                "over check_every steps (0: run the full budget)"))
    check_every: int = field(default=10, metadata=_h("steps between loss checks (finite, tolerance): the only "
                                                     "host syncs of the loop on CUDA"))
    ncc_window: int = field(default=9, metadata=_h("local NCC window per axis (odd)"))
    integrate_steps: int = field(default=7, metadata=_h("scaling-and-squaring steps (diffeomorphic)"))
    padding: str = field(default="border", metadata=_h("warp padding: border or zeros"))
    seed: int = field(default=0, metadata=_h("seed of torch's RNG during the refinement"))
    threads: int = field(default=1, metadata=_h("torch CPU threads during the refinement (0: leave as is)"))
    cuda_graph: bool = field(default=False, metadata=_h("CUDA only: capture one step per level in a CUDA graph"))
    compile: bool = field(default=False, metadata=_h("torch.compile the loss of each level (compiles once per "
                                                     "level size)"))
    progress: bool = field(default=True, metadata=_h("progress bar (only when stderr is a terminal)"))
    full_resolution: bool = field(default=False, metadata=_h("refine at the input's resolution; default: on the "
                                                             "grid the network ran on (the model's spacing: a 1 mm "
                                                             "pair refines at 2 mm, 8x fewer voxels)"))
    extractor: Any = field(default=None, metadata={"cli": False, "help": "DeepSim feature extractor: nn.Module "
                                                                        "with extract_features, or a .safetensors"})

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"refine {name} must be {want}, got {getattr(self, name)!r}")

        for name in ("iterations", "levels", "check_every", "ncc_window", "integrate_steps", "seed", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise bad(name, "an int")
        if self.iterations is not None and not 0 <= self.iterations <= MAX_ITERATIONS:
            raise bad("iterations", f"an int in [0, {MAX_ITERATIONS}] (Adam steps per pyramid level)")
        if self.loss is not None and self.loss not in REFINE_LOSSES:
            raise ValueError(f"unknown refine loss {self.loss!r}; valid: {', '.join(REFINE_LOSSES)}")
        for name in ("lam", "lr", "bending", "tol"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v):
                raise bad(name, "a number")
        for name in ("lam", "bending", "tol"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise bad(name, "a number >= 0")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", "a number > 0")
        if self.levels < 1:
            raise bad("levels", "an int >= 1")
        if self.check_every < 1:
            raise bad("check_every", "an int >= 1")
        if self.ncc_window < 1 or self.ncc_window % 2 == 0:
            raise bad("ncc_window", "an odd int >= 1")
        if self.integrate_steps < 0 or self.threads < 0:
            raise bad("integrate_steps" if self.integrate_steps < 0 else "threads", "an int >= 0")
        if self.padding not in ("border", "zeros"):
            raise bad("padding", "'border' or 'zeros'")

    def resolve(self, ndim: int) -> RefineConfig:
        """A copy with every None field set to the measured default for `ndim` (2 or 3)."""
        if ndim not in DEFAULTS:
            raise ValueError(f"refinement works on 2D or 3D images, got ndim={ndim!r}")
        fill = {k: v for k, v in DEFAULTS[ndim].items() if getattr(self, k) is None}
        if self.lam is None:
            fill["lam"] = DEFAULTS[ndim]["lam"] * LAM_SCALE[fill.get("loss", self.loss)]
        return dataclasses.replace(self, **fill)

    @property
    def needs_extractor(self) -> bool:
        return self.loss is not None and self.loss.startswith("deepsim_")
