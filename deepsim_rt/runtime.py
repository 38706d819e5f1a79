"""Registration runtime: load any deepsim_rt artifact, register image pairs of any size on the fastest backend.

    reg = Registrator.load("default-3d")                  # bundled weights, eager PyTorch
    reg = Registrator.load("model.onnx")                  # ONNX Runtime (TensorRT -> CUDA -> CPU providers)
    reg = Registrator.load("model.pt2")                   # AOTInductor package
    reg = Registrator.load("model.plan")                  # TensorRT engine (+ its .json metadata sidecar)
    reg = Registrator.load("reg.safetensors", backend="onnxruntime")   # exports (and verifies) into a cache dir
    out = reg.register(moving, fixed, moving_labels=labels)
    out.warped, out.displacement, out.warped_labels

Backends: "eager" (PyTorch), "compile" (torch.compile, dynamic shapes), "onnxruntime", "aoti", "tensorrt";
"auto" takes the artifact's own backend (eager for a checkpoint).

What `register` does around the network (the network's input contract is in the artifact's metadata):
  1. Input forms, for convenience: an image may be spatial only ((H, W) / (D, H, W)), (C, *S) or batched
     (B, C, *S); numpy or torch, any real dtype. A rank-(ndim + 1) input is ALWAYS read as (C, *S): batches must
     carry their channel axis. moving, fixed (and labels, with C = 1) must have the same form and sizes. Results
     come back in the form, array type and device of `moving` (float32 images, labels in their own dtype).
  2. Intensities: normalized per sample (over channels and voxels) to [0, 1] by the model's input contract
     (cfg.intensity, deepsim_rt.nn.intensity): "minmax" (min and max; the bundled defaults) or "percentile"
     ((x - p0.5) / (p99.5 - p0.5) clipped, the synthesis-trained nets, so a bright scalp or an outlier voxel does
     not squash the brain); a constant image becomes all zeros. The warped image is mapped back to the moving
     image's own units (for "percentile": to its [p0.5, p99.5], the range the network saw). A "percentile" serving
     artifact gets the raw, unpadded images and normalizes and pads them itself (percentiles are not idempotent,
     see export.serving); its displacement equals the checkpoint's to fp32 rounding.
  3. Spatial sizes: padded to the network's multiple (2**stages), split evenly before / after on every axis, and
     cropped back. The pad mode follows the model's warp padding: "border" -> replicate padding, "zeros" -> zero
     padding (in normalized units, i.e. the image minimum). With that choice, warping the padded image and
     cropping equals warping the unpadded image with the same padding rule, so the crop is exact, not an
     approximation near the edge. The displacement is in voxels and is not changed by the crop.
  4. Labels are warped by the cropped displacement with `label_mode` (deepsim_rt.transforms.resample, the model's
     padding): "generic" (default; ANTs' genericLabel: each label's indicator warped linearly, the arg-max per
     voxel; +0.006 / +0.003 test Dice over nearest for the bundled 2D / 3D nets) or "nearest". Either way no
     label value is ever interpolated.
  5. Voxel spacing: with register(..., spacing=mm) and a model that records its training spacing, the network
     runs at the model's spacing over the same field of view and its displacement comes back to the input grid
     (see `Registrator.network_displacement`); arrays without a spacing run as given.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deepsim_rt._checks import check_choice
from deepsim_rt._io import file_sha256
from deepsim_rt.export.metadata import ArtifactInfo
from deepsim_rt.kernels import warp
from deepsim_rt.nn.checkpoint import load_model
from deepsim_rt.nn.config import NetConfig
from deepsim_rt.nn.intensity import minmax_normalize, normalize  # one definition: training, runtime, serving graphs
from deepsim_rt.refine.config import NO_MODEL, RefineConfig
from deepsim_rt.transforms.pad import crop, pad_amounts, pad_to_multiple  # re-exported: runtime callers
from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE, LABEL_MODES, warp_labels

__all__ = [
    "BACKENDS", "BUNDLED_MODELS", "RegistrationResult", "Registrator", "EagerBackend", "bundled_model_path",
    "resolve_model", "minmax_normalize", "pad_to_multiple", "pad_amounts", "crop", "as_batch", "NoNetworkBackend",
    "NO_MODEL",
]

BACKENDS = ("auto", "eager", "compile", "onnxruntime", "aoti", "tensorrt")
BUNDLED_MODELS = ("default-2d", "default-3d", "default-3d-4mm")  # default-3d-4mm: the previous 3D default (4 mm grid)
_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The natural backend of each artifact type ("auto").
_SUFFIX_BACKEND = {".safetensors": "eager", ".onnx": "onnxruntime", ".pt2": "aoti", ".plan": "tensorrt",
                   ".engine": "tensorrt"}
_ARTIFACT_BACKENDS = {".onnx": ("onnxruntime",), ".pt2": ("aoti",), ".plan": ("tensorrt",),
                      ".engine": ("tensorrt",)}


# ----------------------------------------------------------------------------------------------------------------
# Helpers: model names, padding, normalization, input forms
# ----------------------------------------------------------------------------------------------------------------
def bundled_model_path(name: str, part: str = "reg") -> Path:
    """Path of a bundled checkpoint: name in BUNDLED_MODELS, part in {"reg", "seg", "ae"} (may not exist)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {BUNDLED_MODELS} or a file path")
    if part not in ("reg", "seg", "ae"):
        raise ValueError(f"part must be 'reg', 'seg' or 'ae', got {part!r}")
    return _WEIGHTS_DIR / name / f"{part}.safetensors"


def resolve_model(model: str | os.PathLike) -> Path:
    """"default-2d" / "default-3d" -> the bundled registration checkpoint; else an existing artifact path."""
    if isinstance(model, str) and model in BUNDLED_MODELS:
        path = bundled_model_path(model)
        if not path.is_file():
            raise ValueError(f"bundled model {model!r} not found at {str(path)!r}: its weights are not installed "
                             "(train them with `deepsim-rt study`), or pass a model file path")
        return path
    path = Path(model)
    if path.suffix not in _SUFFIX_BACKEND:
        raise ValueError(f"model must be one of {BUNDLED_MODELS} or a path ending in {sorted(_SUFFIX_BACKEND)}, got "
                         f"{str(model)!r}")
    if not path.is_file():
        raise ValueError(f"model file not found: {str(path)!r}")
    return path


def _to_tensor(name: str, x: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_:
            x = x.astype(np.uint8)
        if not (np.issubdtype(x.dtype, np.number)) or np.iscomplexobj(x):
            raise ValueError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        if x.dtype in (np.uint16, np.uint32, np.uint64):
            # torch supports few ops on these: widen (labels only come back in their own dtype anyway).
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if x.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (shape {tuple(x.shape)}, no data): expected a tensor on the "
                             "CPU or a CUDA device")
        x = x.detach()  # registration is inference: inputs that require grad are read, never differentiated
        return (x.to(torch.uint8) if x.dtype == torch.bool else x), False
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def as_batch(name: str, x: torch.Tensor, ndim: int, channels: int) -> tuple[torch.Tensor, int]:
    """Bring an image to (B, C, *S): rank ndim -> (1, 1, *S); ndim + 1 -> (C, *S) -> (1, C, *S); ndim + 2 as is.

    Returns (batched tensor, how many leading axes were added: 2, 1 or 0). Raises ValueError on another rank or a
    channel count other than `channels`.
    """
    sp = "(D, H, W)" if ndim == 3 else "(H, W)"
    if x.dim() == ndim:
        x, added = x[None, None], 2
    elif x.dim() == ndim + 1:
        x, added = x[None], 1
    elif x.dim() == ndim + 2:
        added = 0
    else:
        raise ValueError(f"{name}: this is a {ndim}D model; it takes {sp}, (C, *S) or (B, C, *S) arrays, got shape "
                         f"{tuple(x.shape)} (rank {x.dim()})")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: the model expects {channels} channel(s), got {x.shape[1]} (shape "
                         f"{tuple(x.shape)} read as (B, C, *S); a rank-{ndim + 1} input is read as (C, *S))")
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x, added


def _restore(x: torch.Tensor, added: int, as_numpy: bool, device: torch.device) -> Any:
    for _ in range(added):
        x = x[0]
    if as_numpy:
        return x.detach().cpu().numpy()
    return x.detach().to(device)


# ----------------------------------------------------------------------------------------------------------------
# Results and backends
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationResult:
    """Output of `Registrator.register`, in the form (rank, array type, device) of the `moving` argument.

    warped:        moving image warped onto the fixed grid, float32, in the moving image's intensity units
    displacement:  (ndim, *S) or (B, ndim, *S), float32, voxels, channel i along spatial axis i;
                   warped(p) = moving(p + displacement(p)). (Rank ndim + 1 for unbatched inputs of any form.)
    warped_labels: moving labels warped with the label mode ("generic" or "nearest"), their own dtype; None when
                   no labels were given
    scale:         what was done about voxel spacing (transforms.scale.SpacingPlan.as_dict() plus "label_mode"),
                   JSON-ready; {"resampled": False, ...} when the network ran on the input grid
    """

    warped: Any
    displacement: Any
    warped_labels: Any = None
    scale: dict | None = None


class Backend(Protocol):
    """What a runtime backend provides. Inputs are normalized, padded, contiguous fp32 (B, C, *S) on `device`."""

    name: str
    info: ArtifactInfo
    device: torch.device

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (warped (B, C, *S), displacement (B, ndim, *S)), fp32 torch tensors on `device`."""
        ...


class EagerBackend:
    """A RegNet in PyTorch: eager, or torch.compile'd with dynamic shapes (compile=True; first call compiles)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, info: ArtifactInfo,
                 compile: bool = False, cuda_graph: bool = False, graph_backend: Any = None) -> None:
        if compile and cuda_graph:
            raise ValueError("cuda_graph=True replays the eager network; it cannot be combined with compile=True")
        self.model = model.to(device).eval()
        self.device = device
        self.info = info
        self.name = "compile" if compile else "eager"
        # dynamic=True: one graph for every padded size instead of a recompile per new shape.
        self._fn = torch.compile(self.model, dynamic=True) if compile else self.model
        # cuda_graph: one CUDA graph per input shape, replayed with one host call. At 2 mm (80x96x80) an inference
        # is ~8 Triton launches + the network's ~40 cuDNN/ATen ones, each 10-40 us of host for 4-8 us of GPU work
        # (benchmarks/launch_cost.py), so eager inference is launch-bound on a GPU. Off CUDA it runs eagerly.
        self.cuda_graph = cuda_graph
        self._graph_backend = graph_backend  # None: torch.cuda; tests pass a stand-in (kernels.cuda_graph)
        self._graphs: dict[tuple, Any] = {}

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if not self.cuda_graph:
                return self._fn(moving, fixed)
            from deepsim_rt.kernels.cuda_graph import GraphedCallable

            key = (tuple(moving.shape), tuple(fixed.shape), moving.dtype, moving.device)
            graphed = self._graphs.get(key)
            if graphed is None:
                # clone=True: the caller keeps its results past the next replay (the graph's own buffers are reused)
                graphed = self._graphs[key] = GraphedCallable(lambda m, f: self._fn(m, f), clone=True,
                                                              backend=self._graph_backend)
            warped, disp = graphed(moving, fixed)
        return warped, disp


class NoNetworkBackend:
    """The backend of pure optimisation (`--model none`): no network, the identity (zero displacement); the
    refinement (register(..., refine=RefineConfig(...))) does the work, from zero, on the images' own grid."""

    name = NO_MODEL

    def __init__(self, ndim: int, device: torch.device, channels: int = 1) -> None:
        if ndim not in (2, 3):
            raise ValueError(f"--model none registers 2D or 3D images, got {ndim}D data")
        # The tiny preset only supplies the input contract (ndim, channels, padding); no weights are built.
        cfg = NetConfig.make("reg", ndim, "tiny", in_channels=channels)
        self.info = ArtifactInfo(artifact="registration", cfg=cfg, inputs=("moving", "fixed"),
                                 outputs=("warped", "displacement"), extra={"model": NO_MODEL})
        self.device = device

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = moving.new_zeros((moving.shape[0], self.info.cfg.ndim, *moving.shape[2:]))
        return moving, zeros


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible")
    return dev


def _registration_info(model: torch.nn.Module, source_sha256: str = "") -> ArtifactInfo:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, NetConfig) or cfg.kind != "reg":
        raise ValueError(f"a Registrator needs a registration model (RegNet, config kind 'reg'), got "
                         f"{type(model).__name__} with config kind {getattr(cfg, 'kind', None)!r}")
    return ArtifactInfo(artifact="registration", cfg=cfg, inputs=("moving", "fixed"),
                        outputs=("warped", "displacement"), source_sha256=source_sha256)


# ----------------------------------------------------------------------------------------------------------------
# Registrator
# ----------------------------------------------------------------------------------------------------------------
class Registrator:
    """Pairwise registration with any backend; see the module docstring for what `register` does around it."""

    def __init__(self, backend: Backend, source: str = "", model_spacing: tuple[float, ...] | None = None) -> None:
        if backend.info.artifact != "registration":
            raise ValueError(f"a Registrator needs a registration artifact, got a {backend.info.artifact!r} one")
        self.backend = backend
        self.source = source
        # The voxel spacing (mm, tensor order) the network was trained at: from the checkpoint's "spacing_mm"
        # metadata, or an exported artifact's metadata extra; None for files that predate it.
        self.model_spacing = model_spacing if model_spacing is not None else _artifact_spacing(backend.info)
        self.artifact_path: Path | None = None  # set by load(): the exported file actually run, if any

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module, backend: str = "eager", device: str | torch.device | None = "auto",
                   source_sha256: str = "", model_spacing: tuple[float, ...] | None = None,
                   cuda_graph: bool = False) -> Registrator:
        """Wrap an in-memory RegNet (e.g. straight out of training): backend "eager" or "compile".
        model_spacing: the voxel spacing (mm per axis) it was trained at, for register(..., spacing=...).
        cuda_graph: eager backend on CUDA: capture the network once per input shape and replay it."""
        if backend not in ("eager", "compile"):
            raise ValueError(f"from_model supports backend 'eager' or 'compile', got {backend!r}; export the model "
                             "(deepsim_rt.export) or save it and use Registrator.load for the others")
        info = _registration_info(model, source_sha256)
        return cls(EagerBackend(model, _resolve_device(device), info, compile=backend == "compile",
                                cuda_graph=cuda_graph),
                   source=f"<in-memory {type(model).__name__}>", model_spacing=model_spacing)

    @classmethod
    def no_network(cls, ndim: int, device: str | torch.device | None = "auto", channels: int = 1) -> Registrator:
        """A Registrator without a network, for pure optimisation: call register(..., refine=RefineConfig(...)).
        Without a network there is no training spacing: images are registered on their own grid as given."""
        return cls(NoNetworkBackend(ndim, _resolve_device(device), channels), source=NO_MODEL)

    @classmethod
    def load(cls, model: str | os.PathLike = "default-2d", backend: str = "auto",
             device: str | torch.device | None = "auto", cache_dir: str | os.PathLike | None = None,
             threads: int | None = None, verify: bool = True, cuda_graph: bool = False) -> Registrator:
        """Load a registration model.

        model: "default-2d" | "default-3d" (bundled weights) or a path to .safetensors / .onnx / .pt2 / .plan.
        backend: one of BACKENDS. From a .safetensors checkpoint every backend works: "onnxruntime" and "aoti"
            export it first (verified against PyTorch unless verify=False) into `cache_dir`, default the persistent
            user cache keyed by checkpoint hash (export.cache: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt), so each
            model is exported once per backend and device. An exported artifact runs on its own backend only.
            Exported artifacts may be network-only ("minmax" / "percentile", sizes a multiple of 8) or serving
            graphs ("raw", any size; metadata intensity / extra.graph say which): `register` works with both: a
            "minmax" serving graph given normalized, padded inputs returns the network's output unchanged
            (export.serving), a "percentile" one is given the raw images (module doc, item 2).
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda[:i]".
        threads: intra-op threads for ONNX Runtime (None: its default).
        cuda_graph: backend "eager" on CUDA only: the network is captured in a CUDA graph per input shape and
            replayed (one host call per inference instead of dozens of launches); elsewhere it runs eagerly.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        path = resolve_model(model)
        suffix = path.suffix
        if backend == "auto":
            backend = _SUFFIX_BACKEND[suffix]
        if cuda_graph and backend != "eager":
            raise ValueError(f"cuda_graph=True needs backend 'eager' (it replays the PyTorch network), got {backend!r}")
        dev = _resolve_device(device)
        if backend == "onnxruntime" and device in (None, "auto") and dev.type == "cuda":
            # torch sees a GPU, but the installed onnxruntime may be a CPU build (the lent GPU box's is)
            from deepsim_rt.export.ort import _GPU_PROVIDERS, available_providers

            if not any(p in available_providers() for p in _GPU_PROVIDERS):
                dev = torch.device("cpu")
        if suffix in _ARTIFACT_BACKENDS and backend not in _ARTIFACT_BACKENDS[suffix]:
            raise ValueError(f"{str(path)!r} is a {suffix} artifact; it runs with backend "
                             f"{_ARTIFACT_BACKENDS[suffix][0]!r} (or 'auto'), not {backend!r}")
        spacing = None
        source = str(path)  # the model the user named (for an exported checkpoint: the checkpoint, not the cache file)
        if suffix == ".safetensors":
            from deepsim_rt.nn.checkpoint import read_spacing

            net = load_model(path, map_location="cpu")
            info = _registration_info(net, file_sha256(path))
            spacing = read_spacing(path)
            if backend in ("eager", "compile"):
                return cls(EagerBackend(net, dev, info, compile=backend == "compile", cuda_graph=cuda_graph),
                           source=str(path), model_spacing=spacing)
            path = _export_for_backend(path, backend, dev, cache_dir, verify)
        if path.suffix == ".pt2" and device in (None, "auto"):
            dev = None  # a package runs on the device type it was compiled for: let it say which
        runner = _open_artifact(path, backend, dev, threads)
        reg = cls(runner, source=source, model_spacing=spacing)
        reg.artifact_path = path  # the file actually run (a cache entry for an exported checkpoint)
        return reg

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def info(self) -> ArtifactInfo:
        return self.backend.info

    @property
    def cfg(self) -> NetConfig:
        return self.backend.info.cfg

    @property
    def ndim(self) -> int:
        return self.cfg.ndim

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def __repr__(self) -> str:
        return (f"Registrator({self.ndim}D, backend={self.backend_name!r}, device={str(self.device)!r}, "
                f"source={self.source!r})")

    # -- the call -------------------------------------------------------------------------------------------------
    def register(self, moving: Any, fixed: Any, moving_labels: Any = None, refine: Any = None,
                 spacing: Any = None, label_mode: str = DEFAULT_LABEL_MODE, mask: Any = None) -> RegistrationResult:
        """Register `moving` onto `fixed`; see the module docstring for accepted forms and what happens around
        the network. moving, fixed: same form and shape; moving_labels: like moving with one channel.
        spacing: the inputs' voxel spacing in mm (one number, or one per spatial axis in tensor order); with it,
        and a model that records its training spacing, the network runs at the model's spacing (see
        `network_displacement`); None (arrays without a grid) runs it on the input grid as given.
        label_mode: "generic" (ANTs genericLabel: per-label linear indicators, arg-max) or "nearest".
        refine: a deepsim_rt.refine.RefineConfig to refine the network's displacement per pair (instance
        optimisation on the normalised, unpadded images), None = the network alone.
        mask: with refine, a mask on the fixed grid (like fixed with one channel; non-zero = inside, e.g. the brain):
        the refinement's similarity counts the voxels inside only. None: every voxel."""
        cfg = self.cfg
        nd, ch = cfg.ndim, cfg.in_channels
        m_t, m_np = _to_tensor("moving", moving)
        f_t, _ = _to_tensor("fixed", fixed)
        out_device = m_t.device
        m_b, added = as_batch("moving", m_t, nd, ch)
        f_b, f_added = as_batch("fixed", f_t, nd, ch)
        if m_b.shape != f_b.shape or added != f_added:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(m_t.shape)} and "
                             f"{tuple(f_t.shape)}")
        m_b = m_b.to(self.device, torch.float32)
        f_b = f_b.to(self.device, torch.float32)
        for name, x in (("moving", m_b), ("fixed", f_b)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or Inf values (shape {tuple(x.shape)})")
        labels_b = None
        if moving_labels is not None:
            l_t, _ = _to_tensor("moving_labels", moving_labels)
            labels_b, l_added = as_batch("moving_labels", l_t, nd, 1)
            if labels_b.shape[0] != m_b.shape[0] or labels_b.shape[2:] != m_b.shape[2:] or l_added != added:
                raise ValueError(f"moving_labels must be shaped like moving with one channel: moving "
                                 f"{tuple(m_t.shape)}, labels {tuple(l_t.shape)}")
            if labels_b.is_floating_point():
                # Same rule as the CLI: float labels must hold integers (they come back in their own dtype).
                if not bool((torch.isfinite(labels_b) & (labels_b == labels_b.round())).all()):
                    raise ValueError(f"moving_labels must be integer-valued, got non-integer or non-finite values "
                                     f"in a {labels_b.dtype} array")
                labels_b = labels_b.to(torch.int64)
            labels_b = labels_b.to(self.device)

        mask_b = None
        if mask is not None:
            if refine is None:
                raise ValueError("mask restricts the refinement's similarity: give refine=RefineConfig(...) with it")
            k_t, _ = _to_tensor("mask", mask)
            mask_b, k_added = as_batch("mask", k_t, nd, 1)
            if mask_b.shape[0] != f_b.shape[0] or mask_b.shape[2:] != f_b.shape[2:] or k_added != f_added:
                raise ValueError(f"mask must be shaped like fixed with one channel: fixed {tuple(f_t.shape)}, mask "
                                 f"{tuple(k_t.shape)}")
            mask_b = (mask_b != 0).to(self.device, torch.float32)
        mov_n, lo, scale = normalize(m_b, cfg.intensity)
        fix_n, _, f_scale = normalize(f_b, cfg.intensity)
        for name, x, s in (("moving", m_b, scale), ("fixed", f_b, f_scale)):
            if bool((s == 0).any()):
                # a constant image normalizes to all zeros: the network still returns a (meaningless) field
                what = (f"constant (every voxel {float(x.flatten()[0]):g})" if cfg.intensity == "minmax" else
                        "constant between its 0.5 and 99.5 % percentiles (>= 99 % of its voxels share one value)")
                warnings.warn(f"{name} image is {what}: there is nothing to register, the displacement is not "
                              "meaningful", RuntimeWarning, stacklevel=2)
        check_choice("label_mode", label_mode, LABEL_MODES)
        if refine is not None and not isinstance(refine, RefineConfig):
            raise ValueError(f"refine must be a RefineConfig or None, got {type(refine).__name__}")
        warped_n, disp, scale_facts = self.network_displacement(mov_n, fix_n, spacing, refine=refine, mask=mask_b,
                                                                raw=(m_b, f_b))
        warped = warped_n * scale + lo
        warped_labels = None
        if labels_b is not None:
            with torch.inference_mode():
                warped_labels = warp_labels(labels_b, disp, mode=label_mode, padding=cfg.padding)
        return RegistrationResult(
            warped=_restore(warped, added, m_np, out_device),
            displacement=_restore(disp, min(added, 1), m_np, out_device),
            warped_labels=None if warped_labels is None else _restore_labels(warped_labels, added, moving_labels,
                                                                              out_device),
            scale={**scale_facts, "label_mode": label_mode},
        )

    def _refine(self, moving: torch.Tensor, fixed: torch.Tensor, displacement: torch.Tensor,
                config: RefineConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Refine `displacement` (B, ndim, *S) of normalised (B, C, *S) images in the model's warp padding; a
        DeepSim loss without an explicit extractor uses the one bundled with the model. -> (B, ndim, *S) float32.
        Without a network the refinement starts from zero."""
        import dataclasses

        from deepsim_rt.refine.optimize import model_extractor, refine

        if not isinstance(config, RefineConfig):
            raise ValueError(f"refine must be a RefineConfig or None, got {type(config).__name__}")
        cfg = dataclasses.replace(config, padding=self.cfg.padding).resolve(self.ndim)
        extractor = cfg.extractor if cfg.extractor is not None else model_extractor(self.source, cfg.loss)
        if extractor is not None:
            cfg = dataclasses.replace(cfg, extractor=extractor)
        init = None if isinstance(self.backend, NoNetworkBackend) else displacement
        return refine(moving, fixed, init=init, config=cfg, mask=mask).displacement.float().contiguous()

    def network_displacement(self, mov_n: torch.Tensor, fix_n: torch.Tensor, spacing: Any = None,
                             refine: RefineConfig | None = None, mask: torch.Tensor | None = None,
                             raw: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The network on normalised (B, C, *S) inputs -> (warped normalised (B, C, *S), displacement
        (B, ndim, *S) in input voxels, facts). Padding to the network's multiple and cropping happen here.

        With `spacing` (mm) and a known model spacing that differs by more than 5 %, both images are resampled to
        the model's spacing over the same field of view (transforms.scale: anti-aliased, linear), the network runs
        there, and its displacement comes back to the input grid (linear, vectors rescaled to input voxels); the
        warped image is then moving warped at the input resolution. A model without a recorded spacing runs on
        the input grid, with a RuntimeWarning.

        refine: instance optimisation (deepsim_rt.refine) of the network's displacement on the grid the network ran
        on (its pyramid's finest level is the model's spacing: a 1 mm pair refines at 2 mm, 8x fewer voxels), or,
        with refine.full_resolution, on the input grid. Without a network: from zero, on the input grid.

        raw: the (moving, fixed) images before normalization, which a "percentile" serving artifact needs (it
        normalizes and pads them itself; on the model grid when resampled); without them such an artifact gets the
        normalized images and re-normalizes them (off by a fraction of one order-statistic gap)."""
        from deepsim_rt.transforms.scale import SpacingPlan, check_spacing

        cfg = self.cfg
        shape = tuple(mov_n.shape[2:])
        if isinstance(self.backend, NoNetworkBackend):  # no network, no training spacing: the input grid as is
            given = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float64).flatten().tolist()
            disp = self.backend(mov_n, fix_n)[1]
            facts = {"input_spacing_mm": given, "model_spacing_mm": None, "input_shape": list(shape),
                     "network_shape": None, "resampled": False}
            if refine is None or refine.iterations == 0:  # --refine 0: the identity; no pyramid to build
                return mov_n, disp, facts
            disp = self._refine(mov_n, fix_n, disp, refine, mask)
            with torch.inference_mode():
                warped_n = warp(mov_n, disp, mode="linear", padding=cfg.padding)
            return warped_n, disp, {**facts, "refined_at": "input grid"}
        plan = s_in = None
        if spacing is not None:
            s_in = check_spacing("spacing", spacing, cfg.ndim)
            if self.model_spacing is None:
                warnings.warn(f"model {self.source} records no training voxel spacing (an older checkpoint): "
                              "registering on the input grid as given", RuntimeWarning, stacklevel=3)
            else:
                plan = SpacingPlan.make(shape, s_in, self.model_spacing)
        mov_in, fix_in = mov_n, fix_n
        if plan is not None and plan.resample:
            mov_in, fix_in = plan.image_to_model(mov_n), plan.image_to_model(fix_n)
        resampled = plan is not None and plan.resample
        if raw is not None and self.info.serving and cfg.intensity == "percentile":
            # the graph normalizes, pads and crops itself: raw images in, the warp of our normalized image here
            # (the graph's 'warped' is in raw units; this keeps warped_n in the units the eager path returns)
            m_raw, f_raw = raw
            if resampled:
                with torch.inference_mode():
                    m_raw, f_raw = plan.image_to_model(m_raw), plan.image_to_model(f_raw)
            disp = self.backend(m_raw.contiguous(), f_raw.contiguous())[1].float().contiguous()
            with torch.inference_mode():
                warped_n = warp(mov_in, disp, mode="linear", padding=cfg.padding)
        else:
            pad_mode = "replicate" if cfg.padding == "border" else "zeros"
            mov_p, pads = pad_to_multiple(mov_in, cfg.spatial_multiple, pad_mode)
            fix_p, _ = pad_to_multiple(fix_in, cfg.spatial_multiple, pad_mode)
            warped_p, disp_p = self.backend(mov_p.contiguous(), fix_p.contiguous())
            warped_n = crop(warped_p, pads).float()
            disp = crop(disp_p, pads).float().contiguous()
        refined_at = None
        if refine is not None and not (resampled and refine.full_resolution):
            mask_in = mask
            if mask is not None and resampled:  # the mask on the network's grid: linear, inside where > 1/2
                with torch.inference_mode():
                    mask_in = (plan.image_to_model(mask) > 0.5).float()
            disp = self._refine(mov_in, fix_in, disp, refine, mask_in)  # on the network's grid
            refined_at = "model grid" if resampled else "input grid"
        if resampled:
            with torch.inference_mode():
                disp = plan.displacement_to_input(disp).contiguous()
        if refine is not None and refined_at is None:  # full_resolution: from the network's field, at the input's
            disp = self._refine(mov_n, fix_n, disp, refine, mask)
            refined_at = "input grid"
        if resampled or refine is not None:
            with torch.inference_mode():
                warped_n = warp(mov_n, disp, mode="linear", padding=cfg.padding)
        facts = plan.as_dict() if plan is not None else {
            "input_spacing_mm": None if s_in is None else list(s_in),
            "model_spacing_mm": None if self.model_spacing is None else list(self.model_spacing),
            "input_shape": list(shape), "network_shape": list(shape), "resampled": False}
        if refined_at is not None:
            facts["refined_at"] = refined_at
        return warped_n, disp, facts

    __call__ = register


def _artifact_spacing(info: ArtifactInfo) -> tuple[float, ...] | None:
    """The training spacing an exported artifact carries in its metadata extra ("spacing_mm"), if any."""
    raw = (info.extra or {}).get("spacing_mm")
    if raw is None:
        return None
    if isinstance(raw, str):
        import json

        raw = json.loads(raw)
    return tuple(float(v) for v in raw)


def _restore_labels(x: torch.Tensor, added: int, original: Any, device: torch.device) -> Any:
    if isinstance(original, np.ndarray):
        out = _restore(x, added, True, device)
        return out.astype(original.dtype, copy=False)
    out = _restore(x, added, False, device)
    return out.to(original.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Exported artifacts (imported lazily: onnxruntime / tensorrt may be absent)
# ----------------------------------------------------------------------------------------------------------------
def _export_for_backend(ckpt: Path, backend: str, device: torch.device, cache_dir: str | os.PathLike | None,
                        verify: bool) -> Path:
    """The checkpoint's RegNet exported for `backend`, from the cache keyed by its hash (export.cache; cache_dir None:
    the persistent user cache); exported and verified on the first call only. Returns the artifact path."""
    from deepsim_rt.export.cache import cached_export

    if backend not in ("onnxruntime", "aoti", "tensorrt"):  # pragma: no cover - checked by the caller
        raise ValueError(f"backend {backend!r} cannot run a checkpoint")
    return cached_export(ckpt, backend, device, root=cache_dir, verify=verify)


class _FlowCompleter:
    """Backend around a flow-only artifact (3D TensorRT-style graph): integrate (if configured) and warp here."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.name = runner.name
        self.info = runner.info
        self.device = runner.device

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from deepsim_rt.kernels import integrate

        (flow,) = self.runner(moving, fixed)
        cfg = self.info.cfg
        with torch.inference_mode():
            if cfg.integrate_steps > 0:
                flow = integrate(flow, steps=cfg.integrate_steps, padding=cfg.padding)
            return warp(moving.to(flow.device), flow, mode="linear", padding=cfg.padding), flow


def _open_artifact(path: Path, backend: str, device: torch.device | None, threads: int | None) -> Backend:
    if backend == "onnxruntime":
        from deepsim_rt.export.ort import OrtRunner

        runner = OrtRunner(path, device=device, threads=threads, expect="registration")
        return _FlowCompleter(runner) if runner.info.extra.get("graph") == "flow" else runner
    if backend == "aoti":
        from deepsim_rt.export.aoti import AotiRunner

        return AotiRunner(path, device=device, expect="registration")
    if backend == "tensorrt":
        from deepsim_rt.export.tensorrt import TrtRunner

        return TrtRunner(path, device=device)  # completes flow-only 3D engines itself
    raise ValueError(f"backend {backend!r} cannot open {str(path)!r}")  # pragma: no cover
