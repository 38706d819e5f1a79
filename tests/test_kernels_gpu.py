"""Real CUDA launches of the Triton kernels (run by `make gpu-check` as `pytest -m gpu`; skipped without CUDA).

Correctness against the float64 reference on the GPU, and graph capture: torch.compile and torch.export must see
the deepsim_rt:: ops as single custom ops (not decomposed, not graph-broken), and AOTInductor must package them.
"""

from __future__ import annotations

import pytest
import torch

import deepsim_rt.kernels as K
from deepsim_rt.kernels import reference as R

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _warp_inputs(nsp, dtype=torch.float32, B=2, C=3, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = (37, 41) if nsp == 2 else (19, 23, 17)
    img = torch.rand(B, C, *S, generator=g).to(DEV, dtype)
    flow = (torch.randn(B, nsp, *S, generator=g) * 3).to(DEV, dtype)
    return img, flow


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("nsp", [2, 3])
def test_warp_cuda_matches_reference(nsp, padding):
    img, flow = _warp_inputs(nsp)
    ki, kf = img.clone().requires_grad_(), flow.clone().requires_grad_()
    ri, rf = img.double().requires_grad_(), flow.double().requires_grad_()
    out = K.warp(ki, kf, "linear", padding)
    ref = R.warp(ri, rf, "linear", padding)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-6)
    up = torch.randn_like(ref)
    out.backward(up.float())
    ref.backward(up)
    torch.testing.assert_close(kf.grad.double(), rf.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ki.grad.double(), ri.grad, rtol=1e-4, atol=1e-4)
    labels = (img * 9).to(torch.int32)
    assert torch.equal(K.warp(labels, flow, "nearest", padding), R.warp(labels, flow, "nearest", padding))
    grads = []
    for _ in range(2):  # deterministic image gradient: bitwise identical across runs
        i = img.clone().requires_grad_()
        K.warp(i, flow, "linear", padding, deterministic=True).backward(up.float())
        grads.append(i.grad)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[0].double(), ri.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_cuda_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 16, 33, 29), (2, 32, 17, 15), (2, 64, 9, 8)]
    fa = [torch.randn(s, generator=g).to(DEV, dtype).requires_grad_() for s in shapes]
    fb = [torch.randn(s, generator=g).to(DEV, dtype).requires_grad_() for s in shapes]
    ra = [x.detach().double().requires_grad_() for x in fa]
    rb = [x.detach().double().requires_grad_() for x in fb]
    out, ref = K.multilayer_cosine(fa, fb), R.multilayer_cosine(ra, rb)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    out.backward()
    ref.backward()
    for k, r in zip(fa + fb, ra + rb, strict=True):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(k.grad.double(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
    assert K.multilayer_cosine(fa, fb).item() == K.multilayer_cosine(fa, fb).item()  # deterministic


def test_integrate_cuda_matches_reference():
    _, flow = _warp_inputs(3, C=3)
    kv, rv = flow.clone().requires_grad_(), flow.double().requires_grad_()
    out, ref = K.integrate(kv, 7), R.integrate(rv, 7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(kv.grad.double(), rv.grad, rtol=1e-3, atol=1e-3)


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_compile_captures_single_custom_ops():
    img, flow = _warp_inputs(3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(moving, v):
        u = K.integrate(v, 7)
        warped = K.warp(moving, u)
        return K.multilayer_cosine([warped], [moving])

    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(img, flow)
    seen = set().union(*(_targets(g) for g in graphs))
    for op in ("deepsim_rt.integrate.default", "deepsim_rt.warp.default", "deepsim_rt.multilayer_cosine.default"):
        assert op in seen or op.rsplit(".", 1)[0] in seen, seen
    # Inductor end to end, forward + backward, against eager.
    torch._dynamo.reset()
    v = flow.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True)(img, v)
    got.backward()
    v2 = flow.clone().requires_grad_()
    want = f(img, v2)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-6)


class _Reg(torch.nn.Module):
    def forward(self, moving, velocity):
        u = K.integrate(velocity, 7)
        return K.warp(moving, u), u


def test_export_and_aoti_capture_single_custom_ops(tmp_path):
    img, flow = _warp_inputs(3)
    ep = torch.export.export(_Reg(), (img, flow))
    seen = _targets(ep.graph_module)
    assert "deepsim_rt.integrate.default" in seen and "deepsim_rt.warp.default" in seen, seen
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "reg.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for got, want in zip(loaded(img, flow), _Reg()(img, flow), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (a tensor on cuda:1 while cuda:0 "
                                                           "is current)")
def test_tensors_on_the_second_device_launch_there():
    img, flow = _warp_inputs(3)
    img1, flow1 = img.to("cuda:1"), flow.to("cuda:1").requires_grad_()
    assert torch.cuda.current_device() == 0
    out = K.warp(img1, flow1)
    out.sum().backward()
    assert out.device == flow1.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), K.warp(img, flow).cpu(), rtol=0, atol=0)
    v = K.integrate(flow1.detach())
    torch.testing.assert_close(v.cpu(), K.integrate(flow).cpu(), rtol=0, atol=0)
