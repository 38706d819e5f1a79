"""Export layer: ONNX (+ ONNX Runtime runner), AOTInductor packages, TensorRT engines, Triton Inference Server repos.

Every export verifies itself against PyTorch and returns the measured error; every artifact carries the metadata of
`deepsim_rt.export.metadata`. Submodules import their heavy dependencies (onnx, onnxruntime, tensorrt) lazily, where
used, so `import deepsim_rt.export` is cheap and works on machines that lack some of them:

    metadata   artifact metadata (format version, input contract, provenance)
    wrappers   fixed-arity nn.Modules for the three artifacts (registration, features, metric)
    verify     error measurement against PyTorch on random and real inputs
    onnx       export_onnx(...), load_onnx_info(...)
    ort        OrtRunner (providers TensorRT -> CUDA -> CPU, IO binding on GPU)
    aoti       export_aoti(...), AotiRunner
    tensorrt   build_engine(...), TrtRunner, the 3D warp plugin
    triton_repo write_triton_repo(...)
    cli        `deepsim-rt export`
"""

from deepsim_rt.export.metadata import ARTIFACT_FORMAT, FORMAT_MAJOR, FORMAT_VERSION, ArtifactInfo, parse_metadata

__all__ = ["ARTIFACT_FORMAT", "FORMAT_MAJOR", "FORMAT_VERSION", "ArtifactInfo", "parse_metadata"]
