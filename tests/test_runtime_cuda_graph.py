"""Registrator's CUDA-graph inference (issue 18 #4) as far as a CPU allows: the capture/replay bookkeeping through
the stand-in graph backend of tests/test_kernels_cuda_graph.py (capture = run once and keep the outputs, replay =
run again into them), so what a CUDA replay does to memory is exercised on the CPU path of the runtime. The real
capture runs in `make gpu-check` (part "graphs")."""

from __future__ import annotations

import pytest
import torch

from deepsim_rt.kernels.cuda_graph import CudaGraphBackend
from deepsim_rt.nn import NetConfig, RegNet
from deepsim_rt.runtime import EagerBackend, Registrator


class ReplayOnCPU(CudaGraphBackend):
    """Capture = run fn once, keep its outputs as the graph's buffers; replay = run fn again (it reads the static
    inputs) and copy into those buffers, which is what a CUDA graph replay does to memory."""

    def __init__(self) -> None:
        self.captures = self.replays = 0

    def usable(self, devices):
        return bool(devices) and all(d.type == "cpu" for d in devices)

    def warmup(self, fn, iters, device):
        for _ in range(iters):
            fn()

    def capture(self, fn, pool, device):
        self.captures += 1
        out = fn()
        return (fn, out), out

    def replay(self, graph):
        self.replays += 1
        fn, buffers = graph
        for buf, new in zip(buffers, fn(), strict=True):
            buf.copy_(new)


def _graphed_registrator() -> tuple[Registrator, ReplayOnCPU]:
    torch.manual_seed(0)
    net = RegNet(NetConfig.make("reg", 2, "tiny"))
    with torch.no_grad():  # away from the near-identity init, so the displacement is not ~0 everywhere
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reg = Registrator.from_model(net, device="cpu", cuda_graph=True)
    stand_in = ReplayOnCPU()
    reg.backend._graph_backend = stand_in
    return reg, stand_in


def test_graphed_inference_equals_eager_and_captures_once_per_shape():
    reg, stand_in = _graphed_registrator()
    eager = Registrator.from_model(reg.backend.model, device="cpu")
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.rand(37, 29, generator=g), torch.rand(37, 29, generator=g)) for _ in range(3)]
    pairs.append((torch.rand(20, 44, generator=g), torch.rand(20, 44, generator=g)))
    outs = []
    for m, f in pairs:
        got = reg.register(m, f)
        want = eager.register(m, f)
        torch.testing.assert_close(got.displacement, want.displacement, rtol=0, atol=0)
        torch.testing.assert_close(got.warped, want.warped, rtol=0, atol=0)
        outs.append(got.displacement)
    # two padded shapes -> two captures; every call replays (the first three share one graph)
    assert (stand_in.captures, stand_in.replays) == (2, 4)
    assert len(reg.backend._graphs) == 2
    # results are copies: a later replay does not overwrite what an earlier call returned
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], eager.register(*pairs[0]).displacement, rtol=0, atol=0)


def test_cuda_graph_needs_the_eager_backend():
    net = RegNet(NetConfig.make("reg", 2, "tiny"))
    with pytest.raises(ValueError, match="cannot be combined with compile"):
        EagerBackend(net, torch.device("cpu"), Registrator.from_model(net, device="cpu").info, compile=True,
                     cuda_graph=True)
    with pytest.raises(ValueError, match="needs backend 'eager'"):
        Registrator.load("default-2d", backend="onnxruntime", cuda_graph=True)
