"""AOTInductor packages (.pt2): torch.export with dynamic shapes -> aoti_compile_and_package, verified on load.

    result = export_aoti(model_or_checkpoint, "reg-cpu.pt2", device="cpu")   # or device="cuda"
    runner = load_package("reg-cpu.pt2")                                       # runner(moving, fixed)

The graph is the same fixed-arity module as the ONNX export (BatchNorm folded, dropout removed), with dynamic batch
and spatial axes: for registration by default the SERVING graph (raw float32 images of any size, normalization /
padding / crop inside, export.serving), 2D and 3D; graph="full" keeps the network-only graph (normalized inputs,
sizes a multiple of the network's multiple).

Batch 1 (issue 18 #1). torch.export traces a dynamic batch under the 0/1 specialisation: the graph is valid for
batch >= 2 only, and AOTInductor's `check_lowerbound` guard then rejects batch 1. With that guard switched off (as
this module did until issue 18) a batch-1 call ran code planned for batch >= 2: on CPU Inductor plans channels-last
buffers, at batch 1 a convolution of the flow head returns a contiguous tensor the next fused kernel reads as
channels-last, and the displacement came out 1-11 voxels wrong (3D serving graph, bundled or tiny widths; exact at
batch 2; 2D and the 3D network-only graph, all that the tests compiled, were not affected). Now the export and the
compile run with `torch.fx.experimental._config.backed_size_oblivious=True`: no 0/1 specialisation, the 3D serving
package's batch range is 1..4096 and its code is exact at batch 1; `check_lowerbound` stays ON (it is the guard that
would have refused the batch-1 call; never switch it off). The self-verification runs every random case at batch 1,
2 and 3, so a batch-1 error fails the export instead of shipping (measured: benchmarks/results/export_gpu_defects.md).

Guards. `load_package` (= AotiRunner) checks every call before the compiled code sees it: input count, torch
tensors, rank ndim + 2, channels, dtype float32 (float64 is REJECTED with a one-line ValueError, never reinterpreted),
non-empty, equal shapes, sizes (a multiple of the net's m for network-only graphs; m + 1 .. 8192 for serving ones);
non-contiguous inputs are MADE contiguous (a copy), never rejected. A package opened with the bare
`torch._inductor.aoti_load_package` has no guards unless the environment sets AOTI_RUNTIME_CHECK_INPUTS=1: then
AOTInductor's own checks reject a wrong dtype / rank / size / stride, and a batch outside the range Inductor
compiled for: 1..4096 for the 3D serving graph, but 2..15 for 2D graphs (torch 2.13's CPU convolution-backend
choice guards on batch > 1 and batch < 16 while Inductor compiles; those packages are verified exact at batch 1 and
were measured exact at 16, 17 and 32, benchmarks/results/export_gpu_defects.md). Use load_package.

On CPU the warp is the ATen reference (grid_sampler, which Inductor compiles to C++); exported on a CUDA device
the deepsim_rt ops dispatch to their Triton kernels, which torch.export captures as `torch.library.triton_op`s
and AOTInductor compiles into the package (their CUDA binaries ship inside it). A package runs on the device type
it was compiled for only (recorded in its metadata).
The deepsim_rt metadata travels in the package's own metadata (`aot_inductor.metadata`, read back with
`get_metadata()`).
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from deepsim_rt.export._io import atomic_named_file
from deepsim_rt.export.metadata import ARTIFACT_FORMAT, ArtifactInfo, build_metadata, io_names, parse_metadata
from deepsim_rt.export.onnx import (
    ExportError,
    dynamic_shapes,
    example_inputs,
    load_source,
    source_extra,
    verification_cases,
)
from deepsim_rt.export.ort import check_inputs
from deepsim_rt.export.verify import VerifyReport, measure
from deepsim_rt.export.wrappers import GRAPHS, default_graph, prepare_for_export, wrap

__all__ = ["AotiExport", "export_aoti", "AotiRunner", "load_package", "read_aoti_info", "PRECISIONS", "batch_cases"]

# Half-precision packages: the network (U-Net + flow head) runs in this dtype, integration and warp in fp32.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AotiExport:
    path: Path
    info: ArtifactInfo
    device: str
    report: VerifyReport | None
    seconds: float


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"AOTInductor packages target 'cpu' or 'cuda', got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("an AOTInductor CUDA package needs a CUDA device here (torch.cuda.is_available() is False)")
    return dev


def export_aoti(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *, artifact: str = "registration",
                device: str | torch.device = "cpu", eps: float = 1e-6, source_sha256: str | None = None,
                verify: bool = True, tolerance: float | None = None, graph: str | None = None,
                precision: str = "fp32") -> AotiExport:
    """Compile `model` (nn.Module or .safetensors) into an AOTInductor package at `path` (.pt2) for `device`.

    graph: None -> "serving" for registration (raw images of any size), "full" for the other artifacts;
    "serving" / "full" as in export.onnx.
    precision: "fp32", or "fp16" / "bf16" (registration: the network in half precision, integration and warp in
    fp32, I/O float32; see export.precision). verify: load the package and compare it with eager fp32 PyTorch (same
    device) on random inputs at batch 1, 2 and 3 and atlas inputs, at sizes other than the trace example; ExportError
    above `tolerance`
    (default: fp32 1e-4, half precision FP16_TOL), and nothing is written.
    """
    from deepsim_rt.export.precision import half_network, precision_tolerance

    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"AOTInductor package path must end in .pt2, got {str(path)!r}")
    dev = _device(device)
    net, sha = load_source(model, artifact, source_sha256)
    cfg = net.cfg
    if graph is None:
        graph = default_graph(artifact)
    if graph not in GRAPHS or graph == "flow":
        raise ValueError(f"an AOTInductor package holds graph 'serving' or 'full', got {graph!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    tolerance = precision_tolerance(precision) if tolerance is None else tolerance
    inputs, outputs = io_names(artifact, len(cfg.enc_channels))
    prepared = prepare_for_export(net)
    if precision != "fp32":
        prepared = half_network(prepared, PRECISIONS[precision])
    module = wrap(prepared.to(dev), artifact, eps=eps, graph=graph)
    reference = wrap(_reference(net, dev), artifact, eps=eps, graph=graph)
    example = tuple(x.to(dev) for x in example_inputs(cfg, artifact, graph=graph))
    meta = build_metadata(artifact, cfg, source_sha256=sha, inputs=inputs, outputs=outputs,
                          intensity="raw" if graph == "serving" else None,
                          extra={"device": dev.type, "eps": eps, "integrate_steps": cfg.integrate_steps,
                                 "padding": cfg.padding, "batchnorm": "folded", "tolerance": tolerance,
                                 "graph": graph, "precision": precision, **source_extra(model)})
    reports: list[VerifyReport] = []

    def write(tmp: str) -> None:
        try:
            # backed_size_oblivious: no 0/1 specialisation of the batch, so the package is valid at batch 1 (module
            # docstring, "Batch 1"); check_lowerbound stays on: it rejects any batch the graph was not traced for.
            with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
                ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(cfg, artifact, graph))
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=tmp, inductor_configs={"aot_inductor.metadata": dict(meta),
                                                            "aot_inductor.check_lowerbound": True})
        except Exception as exc:  # export / inductor / C++ compiler errors: one clear message
            raise ExportError(f"AOTInductor export of the {artifact} model for {dev.type} failed: "
                              f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        if verify:
            runner = AotiRunner(tmp, device=dev, expect=artifact)
            cases = [(name, tuple(x.to(dev) for x in xs))
                     for name, xs in batch_cases(verification_cases(cfg, artifact, tuple(example[0].shape[2:]), graph))]
            rep = measure(reference, runner, cases, outputs, artifact=f"{artifact} AOTInductor {precision}",
                          backend=f"aoti {dev.type}", tolerance=tolerance)
            rep.check()
            reports.append(rep)

    try:
        atomic_named_file(path, write)  # the archive's inner folder is named after the file: the final name
    except ExportError:
        raise
    except ValueError as exc:
        raise ExportError(f"AOTInductor export to {str(path)!r} failed: {exc}") from exc
    return AotiExport(path=path, info=parse_metadata(meta, str(path), expect=artifact), device=dev.type,
                      report=reports[0] if reports else None, seconds=time.perf_counter() - t0)


def batch_cases(cases: list[tuple[str, tuple[torch.Tensor, ...]]]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """`cases` plus each batch-2 random case again at batch 1 (its first sample) and batch 3 (a third sample: the
    first one flipped along the last axis). Batch 1 is where a batch >= 2 specialisation shows (issue 18 #1)."""
    out = list(cases)
    for name, xs in cases:
        if name.startswith("random") and "b=2" in name and xs[0].shape[0] == 2:
            out.append((name.replace("b=2", "b=1"), tuple(x[:1].contiguous() for x in xs)))
            out.append((name.replace("b=2", "b=3"), tuple(torch.cat([x, x[:1].flip(-1)]) for x in xs)))
    return out


def _reference(net: nn.Module, dev: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(net).to(dev).eval()


def _check_archive(path: Path) -> None:
    """Reject a missing / truncated / corrupt package, or a zip that is no .pt2, before the native loader sees it
    (it may abort, or print 15 lines, otherwise)."""
    from deepsim_rt.export._io import check_pt2_package

    check_pt2_package(path)  # exists, is a zip, has the .pt2 layout
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{str(path)!r} is a damaged .pt2 archive: {exc}") from exc
    if bad is not None:
        raise ValueError(f"{str(path)!r} is a damaged .pt2 archive: member {bad!r} fails its CRC check")


def _ours(meta: dict[str, str]) -> dict[str, str]:
    # The package metadata also holds AOTInductor's own keys (AOTI_DEVICE_KEY, ...): keep ours only when present.
    return dict(meta) if meta.get("format") == ARTIFACT_FORMAT else {}


class AotiRunner:
    """Run a deepsim_rt AOTInductor package: `runner(*inputs) -> tuple of torch tensors` on its device."""

    name = "aoti"

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None,
                 expect: str | None = None) -> None:
        path = Path(path)
        self.path = path
        _check_archive(path)
        dev = torch.device(device) if device is not None else None
        try:
            loaded = torch._inductor.aoti_load_package(
                str(path), device_index=(dev.index or 0) if dev is not None and dev.type == "cuda" else -1)
        except Exception as exc:  # RuntimeError from the loader: wrong content, missing .so, other torch ABI
            raise ValueError(f"{str(path)!r} is not a loadable AOTInductor package: {type(exc).__name__}: "
                             f"{str(exc).strip()[:300]}") from exc
        meta = _ours(loaded.get_metadata())
        self.info: ArtifactInfo = parse_metadata(meta, str(path), expect=expect)
        built_for = self.info.extra.get("device", "cpu")
        self.device = dev if dev is not None else torch.device(built_for)
        if self.device.type != built_for:
            raise ValueError(f"{str(path)!r} was compiled for {built_for!r}; it cannot run on {str(self.device)!r} "
                             f"(export one with device={self.device.type!r})")
        self.model = loaded

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Guarded call (see the module docstring): ValueError on a wrong count / rank / channels / dtype / size;
        non-contiguous inputs are copied to contiguous ones (the compiled code assumes contiguous strides)."""
        check_inputs(self.info, inputs)
        xs = [x.detach().to(self.device).contiguous() for x in inputs]
        with torch.inference_mode():
            outs = self.model(*xs)
        return tuple(outs)


def load_package(path: str | os.PathLike, device: str | torch.device | None = None,
                 expect: str | None = None) -> AotiRunner:
    """The documented way to open a deepsim_rt .pt2: archive and metadata checked on load, every call guarded
    (dtype, rank, channels, sizes; non-contiguous inputs made contiguous). Same as AotiRunner(path, ...)."""
    return AotiRunner(path, device=device, expect=expect)


def read_aoti_info(path: str | os.PathLike, expect: str | None = None) -> ArtifactInfo:
    return AotiRunner(path, expect=expect).info
