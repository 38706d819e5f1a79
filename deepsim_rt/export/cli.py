"""`deepsim-rt export`: turn a checkpoint into a verified, self-describing deployment artifact.

    deepsim-rt export --format onnx        --model default-3d --out reg3d.onnx
    deepsim-rt export --format aoti        --model reg.safetensors --out reg-cpu.pt2 [--device cuda]
    deepsim-rt export --format tensorrt    --model default-2d --out reg2d.plan [--precision fp16]
    deepsim-rt export --format triton-repo --model default-3d --out model_repository/ [--name deepsim_reg_3d]
    deepsim-rt export --format onnx --artifact metric --model default-3d --extractor seg --out deepsim3d.onnx

Registration artifacts are SERVING graphs by default (--graph serving): raw float32 images of any size in,
normalization, padding, crop and the intensity mapping inside (deepsim_rt.export.serving); --graph full keeps the
network-only graph (inputs min-max normalized, sizes a multiple of 8). --precision fp16 / bf16 puts the network in
half precision inside the graph (ONNX, AOTInductor, TensorRT strongly typed builds).

Every export is checked against PyTorch on random and real (atlas) inputs at sizes other than the trace example;
the measured max / mean error of every output is printed and the command fails (exit 2, nothing written) when any
exceeds the tolerance it states (fp32: 1e-4; fp16: 2e-2; bf16: 5e-2). Every argument is validated before any export
starts (tolerance, --out and its folder, the format's suffix, precision rules, the checkpoint): an
existing output file or Triton model folder is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("onnx", "aoti", "tensorrt", "triton-repo")


def _source(args: argparse.Namespace) -> Path:
    from deepsim_rt.runtime import BUNDLED_MODELS, bundled_model_path

    part = "reg" if args.artifact == "registration" else args.extractor
    if args.model in BUNDLED_MODELS:
        path = bundled_model_path(args.model, part)
        if not path.is_file():
            raise ValueError(f"bundled {part} checkpoint for {args.model!r} not found at {path}")
        return path
    path = Path(args.model)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"--model must be {BUNDLED_MODELS} or an existing .safetensors checkpoint, got "
                         f"{args.model!r}")
    return path


def _print_report(report, tolerance: float) -> None:
    if report is None:
        print("verification skipped (--no-verify)")
        return
    print(report.summary())
    print(f"OK: every output within the stated tolerance {tolerance:.1g}")


SUFFIXES = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".plan", "triton-repo": None}


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused without a checkpoint, refused first (one line, nothing written; torch-free)."""
    import math

    from deepsim_rt.export._io import check_out_path

    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise ValueError(f"--tolerance must be a finite number > 0 (max abs error vs PyTorch), got {args.tolerance}")
    if args.graph is not None and args.artifact != "registration":
        raise ValueError(f"--graph {args.graph} exists for --artifact registration only")
    if args.precision != "fp32" and args.artifact != "registration":
        raise ValueError(f"--precision {args.precision} exists for --artifact registration only")
    if args.format == "tensorrt" and args.artifact != "registration":
        raise ValueError("--format tensorrt builds registration engines; export features/metric to ONNX and "
                         "use deepsim_rt.export.tensorrt.build_engine")
    if args.format == "tensorrt" and args.precision == "bf16":
        raise ValueError("--format tensorrt builds fp32 or fp16 engines, got --precision bf16")
    onnx_like = args.format in ("onnx", "triton-repo")
    if args.precision == "bf16" and onnx_like and args.opset is not None and args.opset < 22:
        raise ValueError(f"--precision bf16 needs --opset >= 22 (ONNX Conv takes bfloat16 from opset 22), got "
                         f"{args.opset}")
    if args.precision == "bf16" and onnx_like and not args.no_verify:
        raise ValueError("--precision bf16 ONNX graphs cannot be verified here (ONNX Runtime has no bfloat16 Conv "
                         "kernel on the CPU): expected --no-verify with bf16, or --precision fp16 (verified)")
    if args.name is not None and not args.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--name must be letters, digits, '_' or '-', got {args.name!r}")
    if args.engine is not None and not Path(args.engine).is_file():
        raise ValueError(f"--engine must be an existing TensorRT .plan, got {args.engine!r}")
    check_out_path(args.out, SUFFIXES[args.format], overwrite=args.overwrite)


def _check_with_checkpoint(args: argparse.Namespace, src: Path) -> tuple[str | None, int]:
    """The checks that need the checkpoint's config (read from its header, milliseconds): the opset, the Triton model
    folders. Returns (graph to export, ndim)."""
    from deepsim_rt.export.onnx import check_opset
    from deepsim_rt.nn.checkpoint import load_config

    ndim = load_config(src).ndim
    if args.opset is not None:
        check_opset(args.opset)
    graph = None
    if args.artifact == "registration":
        graph = args.graph or "serving"
    if args.format == "triton-repo":
        root = Path(args.out)
        name = args.name or f"deepsim_{args.artifact[:3]}_{ndim}d"
        taken = [m for m in (name, f"{name}_trt") if (root / m).exists()]
        if taken and not args.overwrite:
            raise ValueError(f"--out {str(root)!r} already holds model folder(s) {', '.join(taken)}; pass "
                             "--overwrite to replace them, or --name for another model")
    return graph, ndim


def _cmd(args: argparse.Namespace) -> int:
    _check_args(args)
    src = _source(args)
    graph, _ = _check_with_checkpoint(args, src)
    from deepsim_rt.export.precision import precision_tolerance

    tol = args.tolerance if args.tolerance is not None else precision_tolerance(args.precision)
    verify = not args.no_verify
    out = Path(args.out)
    if args.format == "onnx":
        from deepsim_rt.export.onnx import export_onnx

        res = export_onnx(src, out, artifact=args.artifact, opset=args.opset, target=args.target, verify=verify,
                          tolerance=tol, graph=graph, precision=args.precision)
        _print_report(res.report, tol)
        print(f"wrote {res.path} (opset {res.opset}, {res.seconds:.1f} s)")
    elif args.format == "aoti":
        from deepsim_rt.export.aoti import export_aoti

        res = export_aoti(src, out, artifact=args.artifact, device=args.device, verify=verify, tolerance=tol,
                          graph=graph, precision=args.precision)
        _print_report(res.report, tol)
        print(f"wrote {res.path} ({res.device}, {res.seconds:.1f} s)")
    elif args.format == "tensorrt":
        from deepsim_rt.export.tensorrt import build_registration_engine

        res = build_registration_engine(src, out, precision=args.precision, verify=verify,
                                        timing_cache=args.timing_cache)
        _print_report(res.report, tol)
        print(f"wrote {res.path} and {res.path.name}.json ({res.precision}, {res.seconds:.1f} s)")
    else:
        import tempfile

        from deepsim_rt.export.onnx import export_onnx
        from deepsim_rt.export.triton_repo import write_triton_repo

        with tempfile.TemporaryDirectory(prefix="deepsim_rt_repo_") as tmp:
            res = export_onnx(src, Path(tmp) / "model.onnx", artifact=args.artifact, opset=args.opset,
                              target=args.target, verify=verify, tolerance=tol, graph=graph,
                              precision=args.precision)
            _print_report(res.report, tol)
            repo = write_triton_repo(res.path, out, name=args.name, max_batch_size=args.max_batch_size,
                                     engine=args.engine, overwrite=args.overwrite)
        for model in repo.models:
            print(f"wrote {repo.root / model}/config.pbtxt (parsed against tritonclient's ModelConfig)")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX / AOTInductor / TensorRT / a Triton repo",
                              description=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (.onnx, ONNX Runtime / TensorRT), aoti (.pt2, AOTInductor), tensorrt (.plan engine) or "
                        "triton-repo (a Triton Inference Server model repository folder)")
    p.add_argument("--model", default="default-2d", help="default-2d, default-3d or a .safetensors checkpoint")
    p.add_argument("--out", required=True, help="output file (.onnx/.pt2/.plan) or repository folder")
    p.add_argument("--artifact", default="registration", choices=("registration", "features", "metric"),
                   help="registration: the RegNet (moving, fixed -> warped, displacement); features: the feature "
                        "extractor's multi-level features; metric: DeepSim of two images (similarity + per-level "
                        "cosine maps) (default: %(default)s)")
    p.add_argument("--extractor", default="seg", choices=("seg", "ae"),
                   help="bundled feature extractor for --artifact features/metric (default: %(default)s)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 19 for 2D, 20 for 3D)")
    p.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="ONNX consumer; 'tensorrt' keeps 2D at opset <= 19")
    p.add_argument("--device", default="cpu", help="AOTInductor target device: cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="network precision inside the graph (default: %(default)s; TensorRT: fp32 / fp16)")
    p.add_argument("--graph", default=None, choices=("serving", "full"),
                   help="registration graph: raw images of any size (serving) or the network on normalized, "
                        "padded inputs (full) (default: serving)")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (read and updated)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs error allowed vs PyTorch, > 0 (default 1e-4 fp32, 2e-2 fp16, 5e-2 bf16)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--name", default=None, help="triton-repo: model name (default deepsim_<kind>_<n>d)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="triton-repo: max_batch_size, >= 1 (default: %(default)s)")
    p.add_argument("--engine", default=None, help="triton-repo: a built .plan to put in the TensorRT variant")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (triton-repo: existing model folders); default: refuse")
    p.set_defaults(func=_cmd)
