"""The file-level registration pipeline: files on disk in, files on disk out. One module per job, lower first:

    image        Image: one image with its geometry (array + affine + header + kind image/labels/mask); reading
                 NIfTI / PNG / NPY
    write        one writer per output format (atomic)
    outputs      the all-or-nothing output set (PairResult, commit_outputs / commit_files, --out checks)
    pair         Pair: moving + fixed (+ labels), read and checked before any model loads
    world        NIfTI world space around the network: grids, affine pre-alignment, composition, resampling
    qc           Jacobian / displacement figures and input warnings (training profile)
    register     one pair: read -> register -> QC -> commit (run_register, register_pair, registrator_for)
    batch        a CSV of pairs: resumable, shardable with torchrun
    apply        a saved transform applied to another image or label map

Below it: deepsim_rt.runtime (Registrator: arrays, any backend, no files), deepsim_rt.transforms (grids,
resampling, ITK fields), deepsim_rt.refine. Above it: the `register` / `apply` subcommands (deepsim_rt.register_cli,
deepsim_rt.apply_cli), argument parsers only. Nothing here imports torch at import time except through the
modules that need it on use (register / apply / qc import it inside their functions).
"""

__all__ = ["run_register", "apply_transform", "run_batch", "read_image", "read_pair", "Image", "Pair"]

_LAZY = {"run_register": "register", "apply_transform": "apply", "run_batch": "batch", "read_image": "image",
         "Image": "image", "read_pair": "pair", "Pair": "pair"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'deepsim_rt.pipeline' has no attribute {name!r}")
