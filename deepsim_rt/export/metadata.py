"""Self-description of every exported artifact: what it is, what input it expects, where it came from.

Every artifact (ONNX model, AOTInductor package, TensorRT engine sidecar, Triton repo) carries the same flat
string->string dict (ONNX `metadata_props`, AOTI package metadata, a JSON sidecar beside a `.plan`):

    format             "deepsim_rt.artifact"
    format_version     "MAJOR.MINOR"; a reader accepts any MINOR of its own MAJOR and refuses any other MAJOR
    artifact           "registration" | "features" | "metric"
    config             NetConfig JSON of the network inside (for "metric": the feature extractor's)
    ndim               "2" | "3"          spatial dims of every image input
    in_channels        channels of ONE image input (a registration model takes two such images)
    spatial_multiple   the network's multiple (2**stages); every spatial size fed to a network-only graph must be a
                       multiple of it (the runtime pads); a serving graph pads inside itself and takes any size
    intensity          network-only graphs: the network's own contract (config "intensity", nn.intensity):
                       "minmax" (each image scaled to [0, 1] by its own min and max before the call) or
                       "percentile" (by its 0.5 / 99.5 % percentiles, clipped); serving graphs: "raw" (any float32
                       intensities, normalized inside the graph by the config's contract)
    displacement_convention, displacement_units, channel_order, intensity_contract, size_contract
                       (format 1.1) the contract in words, for a reader without deepsim_rt (export.serving.CONTRACT)
    inputs / outputs   JSON lists of names, in call order (fixed arity)
    deepsim_rt_version, torch_version
    source_sha256      sha256 of the source .safetensors checkpoint ("" when exported from an unsaved model)
    extra              JSON object of artifact-specific facts (opset, integration steps, eps, ...)

This module imports nothing heavy (no onnx / tensorrt): the runtime reads it for every backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deepsim_rt import __version__
from deepsim_rt.nn.config import NetConfig

__all__ = [
    "ARTIFACT_FORMAT", "FORMAT_MAJOR", "FORMAT_VERSION", "ARTIFACT_KINDS", "IO_NAMES", "RAW_INTENSITY", "ArtifactInfo",
    "build_metadata", "parse_metadata",
]

ARTIFACT_FORMAT = "deepsim_rt.artifact"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1  # 1.1: contract-in-words keys, intensity "raw" for serving graphs
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
ARTIFACT_KINDS = ("registration", "features", "metric")
# "raw": a serving graph normalizes inside itself (export.serving); else the network's own contract (cfg.intensity).
RAW_INTENSITY = "raw"

# Input / output names per artifact kind, in call order. "metric" maps_* are per-level per-pixel cosine maps.
IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "registration": (("moving", "fixed"), ("warped", "displacement")),
    "features": (("image",), ("level0", "level1", "level2")),
    "metric": (("a", "b"), ("similarity", "map0", "map1", "map2")),
}

_REQUIRED = ("format", "format_version", "artifact", "config", "ndim", "in_channels", "spatial_multiple",
             "intensity", "inputs", "outputs", "deepsim_rt_version", "torch_version", "source_sha256", "extra")


def io_names(kind: str, n_levels: int = 3) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of an artifact kind; features/metric outputs depend on the number of levels."""
    if kind == "registration":
        return IO_NAMES[kind]
    if kind == "features":
        return ("image",), tuple(f"level{i}" for i in range(n_levels))
    if kind == "metric":
        return ("a", "b"), ("similarity", *(f"map{i}" for i in range(n_levels)))
    raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")


@dataclass(frozen=True)
class ArtifactInfo:
    """Parsed, validated artifact metadata: the input contract plus provenance."""

    artifact: str
    cfg: NetConfig
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    format_version: str = FORMAT_VERSION
    deepsim_rt_version: str = __version__
    torch_version: str = torch.__version__
    source_sha256: str = ""
    extra: dict = field(default_factory=dict)
    input_intensity: str = ""  # "" -> cfg.intensity; "raw" for serving graphs

    @property
    def ndim(self) -> int:
        return self.cfg.ndim

    @property
    def in_channels(self) -> int:
        return self.cfg.in_channels

    @property
    def spatial_multiple(self) -> int:
        return self.cfg.spatial_multiple

    @property
    def intensity(self) -> str:
        """The input contract: "raw" (serving graph: any intensities) or the network's own ("minmax" or
        "percentile"; cfg.intensity says which one a serving graph applies inside)."""
        return self.input_intensity or self.cfg.intensity

    @property
    def serving(self) -> bool:
        """True for a serving graph: raw intensities, any spatial size (no multiple condition)."""
        return self.extra.get("graph") == "serving"

    def to_metadata(self) -> dict[str, str]:
        return build_metadata(self.artifact, self.cfg, source_sha256=self.source_sha256, extra=self.extra,
                              inputs=self.inputs, outputs=self.outputs, intensity=self.input_intensity or None)


def build_metadata(artifact: str, cfg: NetConfig, *, source_sha256: str = "", extra: Mapping | None = None,
                   inputs: tuple[str, ...] | None = None, outputs: tuple[str, ...] | None = None,
                   intensity: str | None = None) -> dict[str, str]:
    """The flat string dict written into an artifact (see the module docstring for every key).

    intensity: None -> the network's contract (cfg.intensity); "raw" for a serving graph.
    """
    from deepsim_rt.export.serving import contract_text

    if artifact not in ARTIFACT_KINDS:
        raise ValueError(f"artifact must be one of {ARTIFACT_KINDS}, got {artifact!r}")
    if not isinstance(cfg, NetConfig):
        raise ValueError(f"cfg must be a NetConfig, got {type(cfg).__name__}")
    if intensity not in (None, cfg.intensity, RAW_INTENSITY):
        raise ValueError(f"intensity must be {cfg.intensity!r} or {RAW_INTENSITY!r}, got {intensity!r}")
    default_in, default_out = io_names(artifact, len(cfg.enc_channels))
    words = (contract_text(intensity or cfg.intensity, cfg.spatial_multiple, cfg.intensity)
             if artifact == "registration" else {})
    return {
        "format": ARTIFACT_FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": artifact,
        "config": cfg.to_json(),
        "ndim": str(cfg.ndim),
        "in_channels": str(cfg.in_channels),
        "spatial_multiple": str(cfg.spatial_multiple),
        "intensity": intensity or cfg.intensity,
        **words,
        "inputs": json.dumps(list(inputs or default_in)),
        "outputs": json.dumps(list(outputs or default_out)),
        "deepsim_rt_version": __version__,
        "torch_version": torch.__version__,
        "source_sha256": source_sha256,
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }


def parse_metadata(meta: Mapping[str, str] | None, where: str, expect: str | None = None) -> ArtifactInfo:
    """Validate artifact metadata read from `where` (a path, for messages) and return its ArtifactInfo.

    Raises ValueError when metadata is missing, not ours, from another MAJOR format version, inconsistent with its
    own config, or (given `expect`) of another artifact kind.
    """
    if not meta:
        raise ValueError(f"{where}: no deepsim_rt metadata (expected key 'format' = {ARTIFACT_FORMAT!r}); it was "
                         "not exported by deepsim_rt, or its metadata was stripped")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{where}: metadata format is {meta.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    version = meta.get("format_version", "")
    major = version.split(".", 1)[0]
    if major != str(FORMAT_MAJOR):
        raise ValueError(f"{where}: artifact format version {version!r} has major {major!r}; this deepsim_rt "
                         f"({__version__}) reads major {FORMAT_MAJOR} only; re-export it with this version")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks required keys {missing}")
    artifact = meta["artifact"]
    if artifact not in ARTIFACT_KINDS:
        raise ValueError(f"{where}: unknown artifact kind {artifact!r}; expected one of {ARTIFACT_KINDS}")
    if expect is not None and artifact != expect:
        raise ValueError(f"{where}: this is a {artifact!r} artifact, expected a {expect!r} artifact")
    cfg = NetConfig.from_json(meta["config"])
    for key, value in (("ndim", cfg.ndim), ("in_channels", cfg.in_channels),
                       ("spatial_multiple", cfg.spatial_multiple)):
        if meta[key] != str(value):
            raise ValueError(f"{where}: metadata {key}={meta[key]!r} disagrees with its config ({value!r})")
    if meta["intensity"] not in (cfg.intensity, RAW_INTENSITY):
        raise ValueError(f"{where}: metadata intensity={meta['intensity']!r} is neither its config's "
                         f"({cfg.intensity!r}) nor {RAW_INTENSITY!r}")
    try:
        inputs = tuple(json.loads(meta["inputs"]))
        outputs = tuple(json.loads(meta["outputs"]))
        extra = json.loads(meta["extra"])
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{where}: metadata inputs/outputs/extra are not valid JSON: {exc}") from exc
    raw = meta["intensity"] == RAW_INTENSITY
    if raw != (extra.get("graph") == "serving"):
        raise ValueError(f"{where}: metadata intensity={meta['intensity']!r} but graph={extra.get('graph')!r}: only "
                         "a serving graph takes raw intensities")
    return ArtifactInfo(artifact=artifact, cfg=cfg, inputs=inputs, outputs=outputs, format_version=version,
                        deepsim_rt_version=meta["deepsim_rt_version"], torch_version=meta["torch_version"],
                        source_sha256=meta["source_sha256"], extra=extra,
                        input_intensity=RAW_INTENSITY if raw else "")
