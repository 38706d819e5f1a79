"""The file-level registration pipeline: files on disk in, files on disk out. One module per job, lower first:

    image        Image: one image with its geometry (array + affine + header + kind image/labels/mask); reading
                 NIfTI / PNG / NPY
    write        one writer per output format (atomic)
    outputs      the all-or-nothing output set (PairResult, commit_outputs / commit_files, --out checks)
    pair         Pair: moving + fixed (+ labels, brain masks), read and checked before any model loads
    orientation  exact axis permutation / flips to the model's training axes and back (nibabel.orientations)
    world        NIfTI world space around the network: grids, affine pre-alignment, masks, composition, resampling
    qc           Jacobian / displacement figures and input warnings (training profile)
    qc_page      the per-pair QC picture and the batch's HTML page
    register     one pair: read -> reorient -> register -> QC -> commit (run_register, register_pair)
    batch        a CSV of pairs: resumable, shardable with torchrun
    apply        a saved transform applied to another image or label map

Below it: deepsim_rt.runtime (Registrator: arrays, any backend, no files), deepsim_rt.transforms (grids,
resampling, ITK fields), deepsim_rt.refine. Above it: the `register` / `apply` subcommands (deepsim_rt.register_cli,
deepsim_rt.apply_cli), argument parsers only, which import this package inside their commands (`--help` loads
no torch). tests/test_layers.py holds the whole package's floor order.
"""

__all__ = ["run_register", "apply_transform", "run_batch", "read_image", "read_pair", "Image", "Pair"]

_LAZY = {"run_register": "register", "apply_transform": "apply", "run_batch": "batch", "read_image": "image",
         "Image": "image", "read_pair": "pair", "Pair": "pair"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'deepsim_rt.pipeline' has no attribute {name!r}")
