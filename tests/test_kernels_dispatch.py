"""Dispatch of the public ops (deepsim_rt.kernels): routing by device and DEEPSIM_RT_BACKEND at call time, the
deepsim_rt:: torch.library ops (run eagerly on CPU under the interpreter here; compiled/exported on the GPU in
test_kernels_gpu.py), and the CPU graph paths: torch.compile, torch.export -> ONNX, AOTInductor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import deepsim_rt.kernels as K
from deepsim_rt.kernels import dispatch
from deepsim_rt.kernels import reference as R

needs_triton = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="triton not installed")


@pytest.fixture
def triton_backend(monkeypatch):
    if not dispatch.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(2, 1, 6, 7, generator=g)
    flow = torch.randn(2, 2, 6, 7, generator=g) * 2
    return img, flow


def test_cpu_routes_to_reference_by_default(monkeypatch):
    monkeypatch.delenv("DEEPSIM_RT_BACKEND", raising=False)
    img, _ = _inputs()
    assert dispatch.backend_for(img) == "reference"
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "reference")
    assert dispatch.backend_for(img) == "reference"
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "")
    assert dispatch.backend_for(img) == "reference"


@needs_triton
def test_backend_env_is_read_at_call_time(monkeypatch):
    img, _ = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "triton")
    assert dispatch.backend_for(img) == "eager"
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "reference")
    assert dispatch.backend_for(img) == "reference"
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.warp(*_inputs())


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DEEPSIM_RT_BACKEND"):
        K.warp(*_inputs())


def test_dtype_mismatch_raises_on_every_backend(monkeypatch):
    img, flow = _inputs()
    for backend in ("reference", "triton") if dispatch.HAS_TRITON else ("reference",):
        monkeypatch.setenv("DEEPSIM_RT_BACKEND", backend)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="same dtype"):
            K.warp(img, flow.double())
        with pytest.raises(ValueError, match="deterministic"):
            K.warp(img, flow, deterministic=1)
        with pytest.raises(ValueError, match="same device"):
            K.warp(img, flow.to("meta"))


def test_integer_labels_with_float_flow_are_fine(monkeypatch):
    img, flow = _inputs()
    labels = (img * 4).to(torch.int64)
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "reference")
    want = K.warp(labels, flow, "nearest")
    if dispatch.HAS_TRITON:
        monkeypatch.setenv("DEEPSIM_RT_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert torch.equal(K.warp(labels, flow, "nearest"), want)


def test_public_ops_on_the_triton_backend_match_the_reference(triton_backend):
    img, flow = _inputs(1)
    fi, ff = img.clone().requires_grad_(), flow.clone().requires_grad_()
    ri, rf = img.double().requires_grad_(), flow.double().requires_grad_()
    (K.warp(fi, ff, "linear", "zeros").sum() + K.integrate(ff, 2).square().sum()
     + K.multilayer_cosine([fi, ff], [ff[:, :1], fi.expand(-1, 2, -1, -1)])).backward()
    (R.warp(ri, rf, "linear", "zeros").sum() + R.integrate(rf, 2).square().sum()
     + R.multilayer_cosine([ri, rf], [rf[:, :1], ri.expand(-1, 2, -1, -1)])).backward()
    torch.testing.assert_close(fi.grad.double(), ri.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ff.grad.double(), rf.grad, rtol=1e-5, atol=1e-4)
    maps = K.multilayer_cosine([img], [flow[:, :1]], reduction="none")
    assert isinstance(maps, tuple) and maps[0].shape == (2, 6, 7)


# ----------------------------------------------------------------------------------------------------------------
# The torch.library ops, eagerly on CPU under the interpreter (on CUDA they are what every call goes through)
# ----------------------------------------------------------------------------------------------------------------
needs_ops = pytest.mark.skipif(not dispatch.HAS_TRITON_OPS or os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs triton + torch.library.triton_op and the interpreter")


@needs_ops
@pytest.mark.parametrize("need", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_warp_op_gradients_follow_needs_input_grad(need, deterministic):
    img, flow = _inputs(2)
    ki, kf = img.clone().requires_grad_(need[0]), flow.clone().requires_grad_(need[1])
    ri, rf = img.double().requires_grad_(need[0]), flow.double().requires_grad_(need[1])
    out = torch.ops.deepsim_rt.warp(ki, kf, "linear", "border", deterministic)
    torch.testing.assert_close(out.double(), R.warp(ri, rf).detach(), rtol=0, atol=2e-6)
    out.square().sum().backward()
    R.warp(ri, rf).square().sum().backward()
    for k, r in ((ki, ri), (kf, rf)):
        if r.requires_grad:
            torch.testing.assert_close(k.grad.double(), r.grad, rtol=1e-5, atol=2e-5)
        else:
            assert k.grad is None


@needs_ops
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cosine_ops_gradients(reduction):
    g = torch.Generator().manual_seed(3)
    fa = [torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 2, 3, 3, 3, generator=g)]
    fb = [torch.randn(x.shape, generator=g) for x in fa]
    need = [(True, False), (False, True)]  # level 0: only a learns; level 1: only b
    ka = [x.clone().requires_grad_(n[0]) for x, n in zip(fa, need, strict=True)]
    kb = [x.clone().requires_grad_(n[1]) for x, n in zip(fb, need, strict=True)]
    ra = [x.double().requires_grad_(n[0]) for x, n in zip(fa, need, strict=True)]
    rb = [x.double().requires_grad_(n[1]) for x, n in zip(fb, need, strict=True)]
    if reduction == "mean":
        torch.ops.deepsim_rt.multilayer_cosine(ka, kb, 1e-6).backward()
        R.multilayer_cosine(ra, rb).backward()
    else:  # only level 1's map is used: level 0's upstream gradient is None -> zeros
        torch.ops.deepsim_rt.multilayer_cosine_maps(ka, kb, 1e-6)[1].sum().backward()
        R.multilayer_cosine(ra, rb, reduction="none")[1].sum().backward()
    for k, r in zip(ka + kb, ra + rb, strict=True):
        if not r.requires_grad:
            assert k.grad is None
        elif r.grad is None:  # an unused map: the op's backward sees a zero upstream gradient
            assert k.grad is None or not k.grad.any()
        else:
            torch.testing.assert_close(k.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


@needs_ops
def test_integrate_op_gradient():
    _, flow = _inputs(4)
    kf, rf = flow.clone().requires_grad_(), flow.double().requires_grad_()
    torch.ops.deepsim_rt.integrate(kf, 2, "border").square().sum().backward()
    R.integrate(rf, 2, "border").square().sum().backward()
    torch.testing.assert_close(kf.grad.double(), rf.grad, rtol=1e-5, atol=1e-4)


@needs_ops
def test_opcheck_schema_and_autograd_registration():
    img, flow = _inputs(5)
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.deepsim_rt.warp.default,
                          (img, flow.clone().requires_grad_(), "linear", "zeros", False), test_utils=checks)
    fa = [torch.randn(1, 2, 4, 5, requires_grad=True)]
    torch.library.opcheck(torch.ops.deepsim_rt.multilayer_cosine.default, ([fa[0]], [fa[0].detach() * 2], 1e-6),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.deepsim_rt.integrate.default, (flow.clone().requires_grad_(), 2, "border"),
                          test_utils=checks)


# ----------------------------------------------------------------------------------------------------------------
# CPU graph paths (reference composite)
# ----------------------------------------------------------------------------------------------------------------
class _WarpAndCompare(torch.nn.Module):
    """moving, fixed, flow -> (warped, per-pixel DeepSim map, similarity): a small model using the public ops."""

    def forward(self, moving, fixed, flow):
        warped = K.warp(moving, flow, "linear", "border")
        sim_map = K.multilayer_cosine([warped], [fixed], reduction="none")[0]
        return warped, sim_map, sim_map.mean()


def test_compile_fullgraph_on_cpu(monkeypatch):
    monkeypatch.delenv("DEEPSIM_RT_BACKEND", raising=False)
    torch._dynamo.reset()
    img, flow = _inputs(6)

    def f(moving, v):
        u = K.integrate(v, 1)
        warped = K.warp(moving, u)
        return warped, K.multilayer_cosine([warped, u], [moving, v])

    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(img, flow), f(img, flow), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_to_onnx_on_cpu(monkeypatch):
    monkeypatch.delenv("DEEPSIM_RT_BACKEND", raising=False)
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    img, flow = _inputs(7)
    fixed = torch.rand(img.shape)
    model = _WarpAndCompare()
    ep = torch.export.export(model, (img, fixed, flow))
    prog = torch.onnx.export(ep, (img, fixed, flow), dynamo=True, verbose=False)
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert "GridSample" in ops, ops
    onnx.checker.check_model(prog.model_proto)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, dict(zip(names, (img.numpy(), fixed.numpy(), flow.numpy()), strict=True)))
    for got, want in zip(outs, model(img, fixed, flow), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aoti_compile_and_package_on_cpu(monkeypatch, tmp_path):
    """~40 s on 2 cores (Inductor C++ build)."""
    monkeypatch.delenv("DEEPSIM_RT_BACKEND", raising=False)
    img, flow = _inputs(8)
    fixed = torch.rand(img.shape)
    model = _WarpAndCompare()
    ep = torch.export.export(model, (img, fixed, flow))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "warp.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for got, want in zip(loaded(img, fixed, flow), model(img, fixed, flow), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_import_and_cpu_calls_work_without_triton():
    """With triton hidden, the package imports, CPU calls run the reference, the triton backend says why
    it cannot run."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` raises ImportError, find_spec("triton") is None
        import os, torch
        import deepsim_rt.kernels as K
        from deepsim_rt.kernels import dispatch
        assert not dispatch.HAS_TRITON
        out = K.warp(torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5))
        assert out.shape == (1, 1, 4, 5)
        os.environ["DEEPSIM_RT_BACKEND"] = "triton"
        try:
            K.warp(torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5))
        except ValueError as e:
            assert "not installed" in str(e), e
        else:
            raise SystemExit("expected ValueError")
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSIM_RT_BACKEND",)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_launch_device_is_the_first_cuda_tensor_and_none_without_one():
    """Triton launches on the current device: launch() switches to this one (a cuda:1 tensor on cuda:1)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deepsim_rt.kernels._triton_common import launch_device

    with FakeTensorMode():  # CUDA-device tensors without a GPU (metadata only)
        on1, on0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert launch_device((torch.zeros(1), 3, on1, on0)) == torch.device("cuda:1")
    assert launch_device((torch.zeros(1), 3, None)) is None
