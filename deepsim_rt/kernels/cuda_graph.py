"""Capture a fixed-shape GPU computation once in a CUDA graph, then replay it: one host call instead of dozens of
launches (issue 18 #4).

At the sizes users run (2 mm, 80x96x80) the host costs more than the GPU work: a registration's inference
launches 8 Triton kernels (7 integration steps + the warp) besides the network's own, one refinement step 26
(benchmarks/launch_cost.py: 10-40 us of host per launch vs 4-8 us of HBM time per kernel on an H100). Replaying a
captured graph costs one cudaGraphLaunch (~10 us of host) for the whole sequence.

    step = GraphedCallable(fn)          # fn(*tensors) -> tensor | tuple/list of tensors | None
    out = step(x)                       # 1st CUDA call: warm-up on a side stream + capture; then copy x in, replay

Contract:
- Shapes, dtypes and devices of the tensor arguments are fixed by the first call; a call that differs raises
  ValueError naming expected vs got (capture a second GraphedCallable per shape, e.g. per refinement level).
- The returned tensors are the graph's own output buffers, overwritten by the next replay (clone=True returns
  copies). Tensors fn closes over (weights, an optimiser's capturable state, a parameter updated in place) are
  part of the graph: update them in place, never rebind them.
- fn must be capturable: no host synchronisation (.item(), printing a CUDA tensor, data-dependent shapes) and no
  CPU tensors created inside. Triton launches through `_triton_common.launch` are (they read no device memory on
  the host); Adam needs `capturable=True` (refine.optimize.level_step(capturable=True)).
- The `warmup` runs before the capture are real runs: a step with side effects (an optimiser step) takes effect
  `warmup` more times on the first call.
- Any non-CUDA argument (CPU, the interpreter tests) or a machine without CUDA: fn runs eagerly, every call
  (`captured` stays False), so callers need no branch of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphedCallable", "CudaGraphBackend"]


class CudaGraphBackend:
    """The CUDA side of `GraphedCallable` (torch.cuda.CUDAGraph); a stand-in with the same four methods lets the
    tests check the static-buffer logic on a CPU."""

    def usable(self, devices: Sequence[torch.device]) -> bool:
        return torch.cuda.is_available() and bool(devices) and all(d.type == "cuda" for d in devices)

    def warmup(self, fn: Callable[[], object], iters: int, device: torch.device | None) -> None:
        # Warm-up on a side stream, as torch.cuda.graphs.make_graphed_callables does: lazy initialisations
        # (cuBLAS handles, Triton's first compile and module load) must happen before capture, off the
        # capturing stream.
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(iters):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        torch.cuda.synchronize(device)

    def capture(self, fn: Callable[[], object], pool, device: torch.device | None):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    def replay(self, graph) -> None:
        graph.replay()


def _flat_outputs(out) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], object]]:
    """fn's result -> (its tensors, rebuild(tensors) -> same structure). Accepts a tensor, a tuple/list of tensors or
    None."""
    if out is None:
        return [], lambda ts: None
    if isinstance(out, torch.Tensor):
        return [out], lambda ts: ts[0]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        kind = type(out)
        return list(out), lambda ts: kind(ts)
    raise ValueError(f"a graphed callable must return a tensor, a tuple/list of tensors or None, got "
                     f"{type(out).__name__}")


class GraphedCallable:
    """fn(*tensors) captured in a CUDA graph on its first CUDA call and replayed after (see the module docstring).

    device: where a zero-argument fn works (it closes over its tensors: a refinement step); with arguments, their
    devices decide. Not CUDA (or None for a zero-argument fn): eager.
    warmup: eager runs on a side stream before the capture (>= 1: Triton compiles and loads its kernels there).
    pool: a graph memory pool handle (torch.cuda.graph_pool_handle()) shared with other graphs of one pipeline.
    clone: return copies of the output buffers instead of the buffers themselves.
    """

    def __init__(self, fn: Callable[..., object], device: torch.device | str | None = None, warmup: int = 2,
                 pool=None, clone: bool = False, backend: CudaGraphBackend | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (Triton compiles on the first run), got {warmup!r}")
        self.fn, self.warmup, self.pool, self.clone = fn, warmup, pool, clone
        self.device = torch.device(device) if device is not None else None
        self.backend = backend or CudaGraphBackend()
        self._graph = None
        self._spec: list[tuple] | None = None
        self._static: list[torch.Tensor] = []
        self._outs: list[torch.Tensor] = []
        self._rebuild: Callable[[list[torch.Tensor]], object] = lambda ts: None
        self.replays = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @staticmethod
    def _spec_of(args: Sequence[torch.Tensor]) -> list[tuple]:
        return [(tuple(a.shape), a.dtype, a.device) for a in args]

    def _check(self, args: tuple) -> None:
        bad = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        if bad:
            raise ValueError(f"a graphed callable takes tensors only, got {type(args[bad[0]]).__name__} as "
                             f"argument {bad[0]}")
        if self._spec is not None and self._spec_of(args) != self._spec:
            raise ValueError(f"a graphed callable replays the shapes it was captured with: expected "
                             f"{self._describe(self._spec)}, got {self._describe(self._spec_of(args))}")

    @staticmethod
    def _describe(spec: list[tuple]) -> str:
        return "(" + ", ".join(f"{list(s)} {str(d).replace('torch.', '')} {dev}" for s, d, dev in spec) + ")"

    def __call__(self, *args: torch.Tensor):
        self._check(args)
        if self._graph is None:
            devices = [a.device for a in args] if args else [self.device] if self.device is not None else []
            if not self.backend.usable(devices):
                return self.fn(*args)  # CPU / interpreter / no CUDA: eager, every call
            self._capture(args)
        else:
            for s, a in zip(self._static, args, strict=True):
                if s.data_ptr() != a.data_ptr():
                    s.copy_(a)
        self.backend.replay(self._graph)
        self.replays += 1
        outs = [o.clone() for o in self._outs] if self.clone else self._outs
        return self._rebuild(outs)

    def _capture(self, args: tuple) -> None:
        self._spec = self._spec_of(args)
        # Static inputs: the graph reads these addresses on every replay; each call copies its arguments in.
        self._static = [a.detach().clone() for a in args]
        device = args[0].device if args else self.device

        def run():
            return self.fn(*self._static)

        self.backend.warmup(run, self.warmup, device)
        graph, out = self.backend.capture(run, self.pool, device)
        self._outs, self._rebuild = _flat_outputs(out)
        self._graph = graph
