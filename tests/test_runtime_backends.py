"""Registrator gives the same Dice on the bundled test pairs with every available backend (within 0.001).

Uses the BUNDLED weights (deepsim_rt/weights/default-{2d,3d}/reg.safetensors) and the synthetic test pairs they were
trained for; skips with the precise reason when a weight file is absent. Default suite: 2D eager vs ONNX Runtime
(one ONNX export, into a persistent cache that a second load reuses). Slow: every backend (torch.compile,
AOTInductor compiles) for 2D and 3D.
"""

from __future__ import annotations

import pytest
import torch

from deepsim_rt.runtime import Registrator, bundled_model_path

DICE_TOL = 1e-3
N_PAIRS = 4


def _need_weights(name: str) -> None:
    path = bundled_model_path(name)
    if not path.is_file():
        pytest.skip(f"bundled weights {name!r} absent at {path} (trained by `deepsim-rt study`, committed by the "
                    "training issue)")


def _pairs(name: str):
    from deepsim_rt.data.synthetic import SyntheticConfig, SyntheticPairs

    ds = SyntheticPairs(SyntheticConfig.preset(name), split="test", pairs="random")
    items = [ds[k] for k in range(min(N_PAIRS, len(ds)))]
    stack = {key: torch.stack([it[key] for it in items]) for key in ("moving", "fixed", "moving_labels",
                                                                       "fixed_labels")}
    return stack, ds


def _dice(reg: Registrator, pairs, n_classes: int) -> torch.Tensor:
    from deepsim_rt.evaluate.metrics import dice_foreground

    out = reg.register(pairs["moving"], pairs["fixed"], pairs["moving_labels"])
    return dice_foreground(out.warped_labels, pairs["fixed_labels"], n_classes)


def _check_backends(name: str, backends: tuple[str, ...], tmp_path, model=None) -> None:
    """model: the artifact to load (default: the bundled weights `name`, whose data preset is also `name`)."""
    from deepsim_rt.data.synthetic import num_classes

    if model is None:
        _need_weights(name)
        model = name
    pairs, ds = _pairs(name)
    k = num_classes(ds.config)
    eager = _dice(Registrator.load(model, backend="eager", device="cpu"), pairs, k)
    assert bool(torch.isfinite(eager).all())
    for backend in backends:
        reg = Registrator.load(model, backend=backend, device="cpu", cache_dir=tmp_path)  # None: user cache
        assert reg.backend_name == backend
        got = _dice(reg, pairs, k)
        diff = float((got - eager).abs().max())
        assert diff <= DICE_TOL, f"{name} {backend}: per-pair Dice differs from eager by {diff:.4g} " \
                                 f"(eager {eager.tolist()}, {backend} {got.tolist()})"


def test_same_dice_eager_vs_onnxruntime_2d(tmp_path, monkeypatch, capfd):
    """Also issue 11 #8: `--backend onnxruntime` on a bundled model re-exported on every call, printed exporter
    warnings ("model in training mode") and named a deleted temp file as the model. Now: exported once into the
    cache keyed by the checkpoint's hash ($DEEPSIM_RT_CACHE), reused by the next load, no such warning, and
    the Registrator names the checkpoint."""
    import warnings

    from deepsim_rt.export.cache import cache_root

    monkeypatch.setenv("DEEPSIM_RT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_backends("default-2d", ("onnxruntime",), None)
    said = capfd.readouterr()
    assert "training mode" not in said.out + said.err + " ".join(str(w.message) for w in caught)
    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert [p.name for p in files] == ["onnxruntime-cpu.onnx"], files
    stamp = files[0].stat().st_mtime_ns
    reg = Registrator.load("default-2d", backend="onnxruntime", device="cpu")
    assert reg.artifact_path == files[0] and files[0].stat().st_mtime_ns == stamp  # reused, not re-exported
    assert reg.source == str(bundled_model_path("default-2d")) and reg.info.serving


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default-2d", "default-3d"])
def test_same_dice_every_backend(name, tmp_path):
    _check_backends(name, ("onnxruntime", "aoti", "compile"), tmp_path)
