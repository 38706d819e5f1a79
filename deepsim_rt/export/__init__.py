"""Export layer: ONNX (+ ONNX Runtime runner), AOTInductor packages, TensorRT engines, Triton Inference Server repos.

Every export verifies itself against PyTorch and returns the measured error; every artifact carries the metadata of
`deepsim_rt.export.metadata`. Submodules import their heavy dependencies (onnx, onnxruntime, tensorrt) lazily, where
used, so `import deepsim_rt.export` is cheap and works on machines that lack some of them:

    metadata   artifact metadata (format version, input contract in words, provenance)
    serving    ServingModule: raw images of any size in, pre/post-processing inside the graph (registration default)
    wrappers   fixed-arity nn.Modules for the three artifacts (registration, features, metric)
    precision  half-precision registration graphs (network fp16/bf16 inside the graph, warp fp32)
    verify     error measurement against PyTorch on random and real inputs
    onnx       export_onnx(...), read_onnx_info(...)
    ort        OrtRunner (providers TensorRT -> CUDA -> CPU, IO binding on GPU)
    aoti       export_aoti(...), load_package(...) / AotiRunner (guarded calls)
    tensorrt   build_engine(...), build_registration_engine(...), TrtRunner (strongly typed, TensorRT 10 and 11)
    trt_plugin the 3D warp as a TensorRT plugin (tensorrt.plugin, AOT Triton kernel); plugin_graph: its ONNX nodes
    triton_repo write_triton_repo(...)
    cache      persistent cache of exported artifacts keyed by checkpoint hash (Registrator.load backends)
    cli        `deepsim-rt export`
"""

# The names below resolve on first use (PEP 562): `deepsim-rt export --help` imports this package for export/cli.py,
# and export.metadata imports torch (2.3 s at load 1.2, 16-22 s on the busy 2-core box; issue 20 item 4).
__all__ = ["ARTIFACT_FORMAT", "FORMAT_MAJOR", "FORMAT_VERSION", "ArtifactInfo", "parse_metadata"]


def __getattr__(name: str):
    if name in __all__:
        from deepsim_rt.export import metadata

        return getattr(metadata, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
