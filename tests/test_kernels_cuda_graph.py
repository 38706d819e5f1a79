"""deepsim_rt.kernels.cuda_graph.GraphedCallable as far as a CPU allows: the eager fallback, the argument checks,
and the capture/replay bookkeeping (static input buffers, outputs overwritten per replay, one capture per shape)
through a stand-in backend whose "graph" re-runs fn on the static buffers and writes into the captured outputs,
i.e. what a CUDA graph replay does to memory. The real capture runs in `make gpu-check`
(benchmarks/launch_cost.py --cuda-graph, and tests/test_kernels_gpu.py-style CUDA tests)."""

from __future__ import annotations

import pytest
import torch

from deepsim_rt.kernels.cuda_graph import CudaGraphBackend, GraphedCallable


class ReplayOnCPU(CudaGraphBackend):
    """Capture = run fn once and keep its outputs; replay = run fn again and copy into those outputs."""

    def __init__(self) -> None:
        self.warmups = self.captures = 0

    def usable(self, devices):
        return bool(devices) and all(d.type == "cpu" for d in devices)

    def warmup(self, fn, iters, device):
        self.warmups += iters
        for _ in range(iters):
            fn()

    def capture(self, fn, pool, device):
        self.captures += 1
        out = fn()
        return fn, out

    def replay(self, graph):
        new = graph()
        outs = new if isinstance(new, (tuple, list)) else [new]
        for o, n in zip(self._outs_ref(), outs, strict=True):
            o.copy_(n)

    def bind(self, g: GraphedCallable):
        self._outs_ref = lambda: g._outs


def _fn(x, y):
    return x * 2 + y, (x - y).sum()


def test_without_cuda_it_runs_eagerly_every_call():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    g = GraphedCallable(fn)
    x = torch.arange(4.0)
    assert torch.equal(g(x), x + 1) and torch.equal(g(x * 2), x * 2 + 1)  # eager: any shape, fresh outputs
    assert not g.captured and len(calls) == 2 and g.replays == 0
    assert GraphedCallable(lambda: torch.ones(2))().sum() == 2  # zero-argument fn, no device: eager


def test_capture_once_then_replay_with_new_inputs_in_the_same_buffers():
    be = ReplayOnCPU()
    g = GraphedCallable(_fn, warmup=3, backend=be)
    be.bind(g)
    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    a, s = g(x, y)
    assert g.captured and be.warmups == 3 and be.captures == 1
    torch.testing.assert_close(a, x * 2 + y)
    torch.testing.assert_close(s, (x - y).sum())
    a2, s2 = g(-x, 2 * y)  # replay: the inputs are copied into the static buffers, the outputs rewritten
    assert be.captures == 1 and g.replays == 2
    assert a2.data_ptr() == a.data_ptr()  # the graph's own output buffer ...
    torch.testing.assert_close(a, -x * 2 + 2 * y)  # ... so the first result was overwritten
    torch.testing.assert_close(s2, (-x - 2 * y).sum())
    assert x.sum() == 15  # the caller's tensors are never written


def test_clone_returns_copies_that_survive_the_next_replay():
    be = ReplayOnCPU()
    g = GraphedCallable(lambda x: x + 1, clone=True, backend=be)
    be.bind(g)
    first = g(torch.zeros(3))
    g(torch.ones(3))
    assert torch.equal(first, torch.ones(3))


@pytest.mark.parametrize(("args", "needle"), [
    ((torch.zeros(2, 4), torch.ones(2, 3)), "expected ([2, 3] float32 cpu, [2, 3] float32 cpu), got "
                                            "([2, 4] float32 cpu, [2, 3] float32 cpu)"),
    ((torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3)), "got ([2, 3] float64 cpu"),
    ((torch.zeros(2, 3), 1.0), "takes tensors only, got float as argument 1"),
])
def test_a_call_that_does_not_match_the_capture_is_refused(args, needle):
    be = ReplayOnCPU()
    g = GraphedCallable(_fn, backend=be)
    be.bind(g)
    g(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError) as e:
        g(*args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_construction_and_bad_outputs_are_one_line_errors():
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedCallable(_fn, warmup=0)
    with pytest.raises(ValueError, match="fn must be callable"):
        GraphedCallable(3)
    be = ReplayOnCPU()
    g = GraphedCallable(lambda x: {"a": x}, backend=be)
    be.bind(g)
    with pytest.raises(ValueError, match="must return a tensor, a tuple/list of tensors or None, got dict"):
        g(torch.zeros(1))


def test_a_zero_argument_step_is_captured_on_its_device_only():
    """A refinement step closes over its parameter and updates it in place: replay = one more step."""
    p = torch.zeros(3)

    def step():
        p.add_(1.0)
        return p.sum()

    be = ReplayOnCPU()
    g = GraphedCallable(step, device="cpu", warmup=1, backend=be)
    be.bind(g)
    g()  # warm-up (1 step) + the stand-in's capture (1 step; a CUDA capture runs nothing) + replay (1 step)
    assert g.captured and torch.equal(p, torch.full((3,), 3.0))
    assert g().item() == 12.0
    eager = GraphedCallable(step, backend=be)  # no device given: eager
    eager()
    assert not eager.captured and torch.equal(p, torch.full((3,), 5.0))


@pytest.mark.gpu
def test_a_captured_registration_replays_the_eager_result_on_cuda():
    """The inference (integrate 7 steps + warp) and a DeepSim loss + gradient through the public ops, captured and
    replayed with new inputs: the same numbers as eager (the kernels are deterministic except the warp's atomics,
    which the flow-only gradient does not use)."""
    import deepsim_rt.kernels as K

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 16, 20, 24, generator=g).cuda()
    feats = [torch.randn(1, c, 8, 10, 12, generator=g).cuda() for c in (4, 8)]

    def infer(v):
        return K.warp(img, K.integrate(v, 7))

    def loss_grad(f0):
        f = f0.detach().requires_grad_(True)
        loss = 1.0 - K.multilayer_cosine([f, feats[1]], [feats[0].flip(-1), feats[1]])
        loss.backward()
        return loss.detach(), f.grad

    for fn, make in ((infer, lambda: torch.randn(1, 3, 16, 20, 24, generator=g).cuda()),
                     (loss_grad, lambda: torch.randn(1, 4, 8, 10, 12, generator=g).cuda())):
        graphed = GraphedCallable(fn, clone=True)
        for _ in range(3):
            x = make()
            got, want = graphed(x), fn(x)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                            strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert graphed.captured and graphed.replays == 3
