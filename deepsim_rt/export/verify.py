"""Every export verifies itself: run the artifact and PyTorch on the same inputs and measure every output's error.

Inputs: fresh random images AND real anatomy (the bundled MNI152 atlas, resampled to the test size, against a
shifted, contrast-changed copy of itself), at spatial sizes different from the one used at export time, so a shape
that was baked into the graph shows up as a failure here rather than in deployment.

`measure(...)` returns a VerifyReport (per case and output: max and mean absolute error); `report.check(tol)`
raises ValueError naming the worst output when it exceeds the stated tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepsim_rt.nn.config import NetConfig
from deepsim_rt.nn.unet import build_model

__all__ = [
    "FP32_TOL", "FP16_TOL", "OutputError", "VerifyReport", "measure", "verify_sizes", "random_image_pair",
    "real_image_pair", "random_regnet", "random_extractor",
]

# fp32 artifacts must agree with PyTorch to 1e-4 absolute on every output (images in [0, 1], displacement in voxels,
# cosine maps in [-1, 1]): kernels differ only in summation order, which costs ~1e-6 on these networks.
FP32_TOL = 1e-4
# fp16 TensorRT engines: half precision carries ~3 decimal digits; 2e-2 voxels / intensity units is what a
# well-conditioned network keeps after 20 fp16 conv layers (measured on a GPU when one is available).
FP16_TOL = 2e-2


@dataclass(frozen=True)
class OutputError:
    case: str
    output: str
    max_abs: float
    mean_abs: float
    shape: tuple[int, ...]


@dataclass
class VerifyReport:
    """Measured errors of an artifact against PyTorch, one row per (input case, output)."""

    artifact: str
    backend: str
    rows: list[OutputError] = field(default_factory=list)
    tolerance: float = FP32_TOL

    @property
    def max_abs(self) -> float:
        return max((r.max_abs for r in self.rows), default=0.0)

    @property
    def mean_abs(self) -> float:
        return max((r.mean_abs for r in self.rows), default=0.0)

    def worst(self) -> OutputError | None:
        return max(self.rows, key=lambda r: r.max_abs, default=None)

    def by_output(self) -> dict[str, tuple[float, float]]:
        """output name -> (max abs error, largest per-case mean abs error) over all cases."""
        out: dict[str, tuple[float, float]] = {}
        for r in self.rows:
            mx, mn = out.get(r.output, (0.0, 0.0))
            out[r.output] = (max(mx, r.max_abs), max(mn, r.mean_abs))
        return out

    def check(self, tolerance: float | None = None) -> VerifyReport:
        tol = self.tolerance if tolerance is None else tolerance
        if not self.rows:
            raise ValueError(f"{self.artifact} ({self.backend}): verification compared nothing")
        w = self.worst()
        if not math.isfinite(w.max_abs) or w.max_abs > tol:
            raise ValueError(f"{self.artifact} ({self.backend}) disagrees with PyTorch: output {w.output!r} on "
                             f"{w.case} {w.shape} has max abs error {w.max_abs:.3g} > tolerance {tol:.1g} (mean "
                             f"{w.mean_abs:.3g})")
        return self

    def summary(self) -> str:
        lines = [f"verification of {self.artifact} on {self.backend} vs PyTorch (tolerance {self.tolerance:.1g}):"]
        for r in self.rows:
            lines.append(f"  {r.case:<28} {r.output:<13} max {r.max_abs:.3e}  mean {r.mean_abs:.3e}")
        lines.append(f"  worst max abs error {self.max_abs:.3e}")
        return "\n".join(lines)


def measure(reference: Callable[..., Sequence[torch.Tensor]], candidate: Callable[..., Sequence[torch.Tensor]],
            cases: Sequence[tuple[str, Sequence[torch.Tensor]]], output_names: Sequence[str], artifact: str,
            backend: str, tolerance: float = FP32_TOL) -> VerifyReport:
    """Run both callables on every case; compare every output (strict zip: arity must match)."""
    report = VerifyReport(artifact=artifact, backend=backend, tolerance=tolerance)
    for case, inputs in cases:
        with torch.inference_mode():
            ref = [t.detach().float().cpu() for t in reference(*inputs)]
        got = [torch.as_tensor(t).detach().float().cpu() for t in candidate(*inputs)]
        if len(ref) != len(got) or len(ref) != len(output_names):
            raise ValueError(f"{artifact} ({backend}): {len(got)} outputs, PyTorch gives {len(ref)}, names "
                             f"{list(output_names)}")
        for name, r, g in zip(output_names, ref, got, strict=True):
            if tuple(r.shape) != tuple(g.shape):
                raise ValueError(f"{artifact} ({backend}): output {name!r} on {case} has shape {tuple(g.shape)}, "
                                 f"PyTorch gives {tuple(r.shape)}")
            d = (r - g).abs()
            report.rows.append(OutputError(case, name, float(d.max()), float(d.mean()), tuple(r.shape)))
    return report


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def verify_sizes(ndim: int, multiple: int, export_size: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Spatial sizes for verification: multiples of `multiple`, none equal to the export example, anisotropic."""
    base = [(3, 5), (4, 3)] if ndim == 2 else [(2, 3, 4), (3, 2, 3)]
    sizes = [tuple(k * multiple for k in b) for b in base]
    if export_size is not None:
        sizes = [s for s in sizes if tuple(s) != tuple(export_size)]
    return sizes


def random_image_pair(spatial: Sequence[int], batch: int = 1, channels: int = 1, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent U[0, 1) images (batch, channels, *spatial), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def real_image_pair(spatial: Sequence[int], channels: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bundled MNI152 atlas resampled to `spatial` (moving) and a shifted, gamma-changed copy (fixed).

    Returns None when the atlas cannot be loaded here (e.g. a deployment box without the data package files); the
    caller then verifies on random inputs only and says so.
    """
    ndim = len(spatial)
    try:
        from deepsim_rt.data.atlas import load_atlas

        atlas = load_atlas(ndim=ndim, voxel_size=4)
    except (ImportError, ValueError, OSError):
        return None
    img = atlas.image.float()
    mode = "bilinear" if ndim == 2 else "trilinear"
    moving = F.interpolate(img, size=tuple(spatial), mode=mode, align_corners=True)
    shift = tuple(max(1, s // 16) for s in spatial)
    fixed = torch.roll(moving, shifts=shift, dims=tuple(range(2, 2 + ndim))).clamp(0, 1) ** 0.8
    return moving.repeat(1, channels, *([1] * ndim)), fixed.repeat(1, channels, *([1] * ndim))


# ----------------------------------------------------------------------------------------------------------------
# Models with non-trivial outputs (for verification without trained weights)
# ----------------------------------------------------------------------------------------------------------------
def _perturb_norms(model: torch.nn.Module, g: torch.Generator) -> None:
    # Fresh BatchNorm layers are the identity in eval (mean 0, var 1, weight 1, bias 0): give them real statistics
    # so that BatchNorm folding is actually exercised by the comparison.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(1.0 + torch.randn(n, generator=g) * 0.1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@torch.no_grad()
def random_regnet(ndim: int, preset: str = "tiny", seed: int = 0, flow_std: float = 1.5, **overrides
                  ) -> torch.nn.Module:
    """An eval-mode RegNet whose displacements are a few voxels and vary in space (unlike a fresh one: ~1e-5).

    The last conv of the flow head is redrawn and rescaled so the displacement on a random pair has standard
    deviation `flow_std` voxels; BatchNorm statistics are randomized. For export tests and verification.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(NetConfig.make("reg", ndim, preset, **overrides)).eval()
    _perturb_norms(model, g)
    last = model.head[-1]
    last.weight.copy_(torch.randn(last.weight.shape, generator=g))
    last.bias.zero_()
    size = (model.cfg.spatial_multiple * 2,) * ndim
    a, b = random_image_pair(size, seed=seed)
    flow = model.displacement(a, b)
    last.weight.mul_(flow_std / max(float(flow.std()), 1e-12))
    return model


@torch.no_grad()
def random_extractor(kind: str, ndim: int, preset: str = "tiny", seed: int = 0, n_classes: int = 4
                     ) -> torch.nn.Module:
    """An eval-mode SegNet ("seg") or AutoEncoder ("ae") with randomized BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kw = {"n_classes": n_classes} if kind == "seg" else {}
    model = build_model(NetConfig.make(kind, ndim, preset, **kw)).eval()
    _perturb_norms(model, g)
    return model
