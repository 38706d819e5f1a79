"""Triton fused multi-layer cosine (interpreter on CPU) against the float64 reference.

Shapes are tiny (the interpreter runs every program in Python) but awkward: odd/anisotropic, 2D and 3D levels in
one pyramid, batch > 1, C from 1 to 6, non-contiguous views. Seeded parametrization: every case is reproducible.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deepsim_rt.kernels import cosine  # noqa: E402  (conftest sets TRITON_INTERPRET first)
from deepsim_rt.kernels import reference as R  # noqa: E402

pytestmark = pytest.mark.interpreter


def _layout(x: torch.Tensor, kind: int) -> torch.Tensor:
    """Same values, different memory layout: 0 contiguous, 1 channels-last, 2 spatially transposed view,
    3 a channel slice of a wider tensor."""
    if kind == 1:
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if kind == 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == 3:
        wide = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return wide[:, : x.shape[1]]
    return x


def _pyramid(g: torch.Generator, dtype=torch.float32, max_levels=4):
    L = int(torch.randint(1, max_levels + 1, (1,), generator=g))
    B = int(torch.randint(1, 4, (1,), generator=g))
    fa, fb = [], []
    for _ in range(L):
        C = int(torch.randint(1, 7, (1,), generator=g))
        if bool(torch.rand((), generator=g) < 0.5):
            shape = tuple(int(n) for n in torch.randint(2, 12, (2,), generator=g))
        else:
            shape = tuple(int(n) for n in torch.randint(2, 7, (3,), generator=g))
        a = torch.randn(B, C, *shape, generator=g)
        # b partly correlated with a so the cosines spread over [-1, 1] rather than cluster at 0.
        b = 0.7 * a + torch.randn(B, C, *shape, generator=g)
        kind = int(torch.randint(0, 4, (1,), generator=g))
        fa.append(_layout(a.to(dtype), kind))
        fb.append(_layout(b.to(dtype), kind if bool(torch.rand((), generator=g) < 0.5) else 0))
    return fa, fb


def _f64(xs):
    return [x.detach().double() for x in xs]


def _natural_scale(x: torch.Tensor, up: torch.Tensor) -> float:
    """Size of each of the two terms of d cos / d x at a pixel: |upstream| / |x|. They cancel exactly when C = 1
    (the exact gradient is 0 there, ~1e-23 in fp64), leaving the rounding of the terms, so atol scales with this."""
    norm = x.detach().double().pow(2).sum(1).clamp_min(1e-6).sqrt()
    return (up.abs() / norm).max().item()


def _mean_upstream(feats):
    return [torch.full((x.shape[0], *x.shape[2:]), 1.0 / (x[:, 0].numel() * len(feats)), dtype=torch.float64)
            for x in feats]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("seed", range(24))
def test_forward_matches_float64_reference(seed, reduction):
    g = torch.Generator().manual_seed(seed)
    fa, fb = _pyramid(g)
    got = cosine.multilayer_cosine(fa, fb, reduction=reduction)
    want = R.multilayer_cosine(_f64(fa), _f64(fb), reduction=reduction)
    if reduction == "mean":
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-7)
    else:
        assert len(got) == len(fa)
        for lvl, (m, w) in enumerate(zip(got, want, strict=True)):
            assert m.shape == (fa[lvl].shape[0], *fa[lvl].shape[2:]), f"level {lvl}"
            torch.testing.assert_close(m.double(), w, rtol=0, atol=5e-7, msg=lambda s, lvl=lvl: f"level {lvl}: {s}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("seed", range(16))
def test_gradients_match_float64_reference(seed, reduction):
    """Each input gets a gradient exactly when it requires one; values agree with the fp64 autograd ones."""
    g = torch.Generator().manual_seed(100 + seed)
    fa, fb = _pyramid(g)
    which = seed % 4  # 0: both, 1: only a, 2: only b, 3: both but level 0 of a frozen
    need_a = [which in (0, 1, 3) and not (which == 3 and i == 0) for i in range(len(fa))]
    need_b = [which in (0, 2, 3)] * len(fb)
    ka = [x.detach().clone().requires_grad_(r) for x, r in zip(fa, need_a, strict=True)]
    kb = [x.detach().clone().requires_grad_(r) for x, r in zip(fb, need_b, strict=True)]
    ra = [x.double().requires_grad_(r) for x, r in zip(_f64(fa), need_a, strict=True)]
    rb = [x.double().requires_grad_(r) for x, r in zip(_f64(fb), need_b, strict=True)]
    if not any(need_a + need_b):
        pytest.skip("no input requires grad")
    out_k = cosine.multilayer_cosine(ka, kb, reduction=reduction)
    out_r = R.multilayer_cosine(ra, rb, reduction=reduction)
    if reduction == "mean":
        out_k.backward()
        out_r.backward()
        ups = _mean_upstream(fa)
    else:  # a random per-pixel upstream gradient for every map
        ups = [torch.randn(m.shape, generator=g, dtype=torch.float64) for m in out_r]
        torch.autograd.backward(list(out_k), [u.float() for u in ups])
        torch.autograd.backward(list(out_r), ups)
    for name, ks, rs in (("a", ka, ra), ("b", kb, rb)):
        for lvl, (k, r) in enumerate(zip(ks, rs, strict=True)):
            if not r.requires_grad:
                assert k.grad is None, f"{name}[{lvl}] got a gradient it did not ask for"
                continue
            scale = _natural_scale(r, ups[lvl])
            torch.testing.assert_close(k.grad.double(), r.grad, rtol=1e-5, atol=1e-6 * scale,
                                       msg=lambda s, name=name, lvl=lvl: f"grad {name}[{lvl}]: {s}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("seed", range(2))
def test_gradcheck_float64(seed, reduction):
    g = torch.Generator().manual_seed(200 + seed)
    fa, fb = _pyramid(g, dtype=torch.float64, max_levels=2)
    a = [x.detach().clone().requires_grad_() for x in fa]
    b = [x.detach().clone().requires_grad_() for x in fb]
    n = len(a)
    assert torch.autograd.gradcheck(lambda *f: cosine.multilayer_cosine(f[:n], f[n:], reduction=reduction),
                                    (*a, *b), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_low_precision_within_twice_torch_error(seed, dtype):
    """err(kernel on bf16/fp16 inputs) <= 2 * err(reference run in that dtype) + atol, both vs fp64 on the same
    (rounded) inputs; forward maps and both gradients."""
    g = torch.Generator().manual_seed(300 + seed)
    fa, fb = _pyramid(g, dtype=dtype, max_levels=3)
    exact_maps = R.multilayer_cosine(_f64(fa), _f64(fb), reduction="none")
    kern_maps = cosine.multilayer_cosine(fa, fb, reduction="none")
    torch_maps = R.multilayer_cosine(fa, fb, reduction="none")
    for k, t, e in zip(kern_maps, torch_maps, exact_maps, strict=True):
        err_k = (k.double() - e).abs().max().item()
        err_t = (t.double() - e).abs().max().item()
        assert err_k <= 2 * err_t + 1e-6, f"kernel error {err_k:.3g} vs torch {err_t:.3g}"

    def grads(fn, xs_a, xs_b, cast):
        a = [cast(x).requires_grad_() for x in xs_a]
        b = [cast(x).requires_grad_() for x in xs_b]
        fn(a, b).backward()
        return [x.grad.double() for x in a + b]

    exact = grads(R.multilayer_cosine, fa, fb, lambda x: x.detach().double())
    kern = grads(cosine.multilayer_cosine, fa, fb, lambda x: x.detach().clone())
    torch_g = grads(R.multilayer_cosine, fa, fb, lambda x: x.detach().clone())
    feats, ups = fa + fb, _mean_upstream(fa) * 2
    for i, (k, t, e) in enumerate(zip(kern, torch_g, exact, strict=True)):
        err_k = (k - e).abs().max().item()
        err_t = (t - e).abs().max().item()
        atol = 1e-3 * _natural_scale(feats[i], ups[i])
        assert err_k <= 2 * err_t + atol, f"grad {i}: kernel {err_k:.3g} vs torch {err_t:.3g} (atol {atol:.3g})"


def test_known_answers():
    g = torch.Generator().manual_seed(7)
    a = [torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 4, 3, 4, 3, generator=g)]
    one = cosine.multilayer_cosine(a, a)
    assert abs(one.item() - 1.0) < 1e-6
    assert abs(cosine.multilayer_cosine(a, [2.5 * x for x in a]).item() - 1.0) < 1e-6
    assert abs(cosine.multilayer_cosine(a, [-x for x in a]).item() + 1.0) < 1e-6
    # Symmetric in a and b.
    b = [torch.randn(x.shape, generator=g) for x in a]
    assert abs(cosine.multilayer_cosine(a, b).item() - cosine.multilayer_cosine(b, a).item()) < 1e-7
    # All-zero features: the eps clamp keeps it finite (0 / sqrt(eps)^2 = 0), no NaN.
    z = [torch.zeros(1, 2, 3, 3)]
    maps = cosine.multilayer_cosine(z, z, reduction="none")
    assert torch.equal(maps[0], torch.zeros(1, 3, 3))
    # Near-zero features show the paper's eps on the SQUARED norm, not F.cosine_similarity's clamp.
    tiny_a, tiny_b = torch.full((1, 1, 2, 2), 1e-4), torch.full((1, 1, 2, 2), 1e-4)
    got = cosine.multilayer_cosine([tiny_a], [tiny_b]).item()
    assert abs(got - 1e-8 / 1e-6) < 1e-7  # 1e-8 / (sqrt(1e-6) * sqrt(1e-6))


def test_levels_are_weighted_equally_after_the_voxel_mean():
    """Level 0 all +1 (large), level 1 all -1 (small): mean over levels = 0, whatever their sizes."""
    a0 = torch.ones(1, 2, 9, 11)
    a1 = torch.ones(1, 3, 2, 2)
    got = cosine.multilayer_cosine([a0, a1], [a0, -a1]).item()
    assert abs(got) < 1e-7


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_more_levels_than_one_launch_holds(reduction):
    """10 levels > MAX_LEVELS = 8: chunked into two launches that share the partial buffer."""
    assert cosine.MAX_LEVELS < 10
    g = torch.Generator().manual_seed(11)
    fa = [torch.randn(2, 1 + i % 3, 3 + i % 2, 4, generator=g, requires_grad=True) for i in range(10)]
    fb = [torch.randn(x.shape, generator=g) for x in fa]
    ra = [x.detach().double().requires_grad_() for x in fa]
    out_k = cosine.multilayer_cosine(fa, fb, reduction=reduction)
    out_r = R.multilayer_cosine(ra, _f64(fb), reduction=reduction)
    if reduction == "mean":
        torch.testing.assert_close(out_k.double(), out_r, rtol=0, atol=2e-7)
        out_k.backward()
        out_r.backward()
    else:
        for k, r in zip(out_k, out_r, strict=True):
            torch.testing.assert_close(k.double(), r, rtol=0, atol=5e-7)
        sum(m.sum() for m in out_k).backward()
        sum(m.sum() for m in out_r).backward()
    ups = _mean_upstream(fa) if reduction == "mean" else [torch.ones(x[:, 0].shape, dtype=torch.float64) for x in fa]
    for k, r, up in zip(fa, ra, ups, strict=True):
        torch.testing.assert_close(k.grad.double(), r.grad, rtol=1e-5, atol=1e-6 * _natural_scale(r, up))


def test_mean_is_bitwise_deterministic():
    g = torch.Generator().manual_seed(5)
    fa, fb = [torch.randn(3, 5, 13, 17, generator=g)], [torch.randn(3, 5, 13, 17, generator=g)]
    runs = [cosine.cosine_fwd(fa, fb).item() for _ in range(2)]
    assert runs[0] == runs[1]


def test_backward_saves_only_the_inputs():
    """Peak extra memory O(pixels): autograd keeps the inputs themselves, no normalized copies."""
    g = torch.Generator().manual_seed(3)
    fa = [torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)]
    fb = [torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cosine.multilayer_cosine(fa, fb)
    assert sum(t.numel() for t in saved) == fa[0].numel() + fb[0].numel()
    assert {t.data_ptr() for t in saved} == {fa[0].data_ptr(), fb[0].data_ptr()}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ([torch.ones(1, 2, 3, 3)], [torch.ones(1, 3, 3, 3)]), "same shape"),
        (lambda: ([torch.ones(1, 2, 3, 3)], [torch.ones(1, 2, 3, 3, dtype=torch.float64)]), "same dtype"),
        (lambda: ([torch.ones(1, 2, 0, 3)], [torch.ones(1, 2, 0, 3)]), "empty"),
        (lambda: ([torch.ones(1, 2, 3, 3)], [torch.ones(1, 2, 3, 3, device="meta")]), "same device"),
        (lambda: ([], []), "at least one"),
        (lambda: (torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3)), "sequences"),
        (lambda: ([torch.ones(1, 2, 3, 3)], [torch.ones(1, 2, 3, 3)] * 2), "number of levels"),
        (lambda: ([torch.ones(1, 2, 3, 3, dtype=torch.int32)], [torch.ones(1, 2, 3, 3, dtype=torch.int32)]),
         "floating"),
    ],
)
def test_bad_input_raises_before_launch(make, match):
    fa, fb = make()
    with pytest.raises(ValueError, match=match):
        cosine.cosine_fwd(fa, fb)


def test_bad_options_raise():
    a = [torch.ones(1, 2, 3, 3)]
    with pytest.raises(ValueError, match="reduction"):
        cosine.cosine_fwd(a, a, reduction="sum")
    for eps in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps"):
            cosine.cosine_fwd(a, a, eps=eps)
    with pytest.raises(ValueError, match="grad map"):
        cosine.cosine_bwd(a, a, [torch.ones(1, 3, 4)], reduction="none")


def test_levels_with_the_most_channels_are_scheduled_first():
    """Longest programs (most channels: the coarsest level) get the lowest program ids, in every launch of 8."""
    feats = [torch.zeros(1, c, 2, 2) for c in (16, 32, 64, 128, 8, 8, 32, 64, 128)]
    levels = [cosine._flat_level(f, f) for f in feats]
    assert cosine._schedule(levels) == [[3, 8, 2, 7, 1, 6, 0, 4], [5]]


def test_gradients_keep_a_dense_input_s_layout_and_are_stored_where_loaded():
    """The backward stores each gradient at the offsets it loaded the inputs from (no layout conversion through
    shared memory for channels-last inputs), so a dense input's gradient has its strides; a channel slice (read in
    place, not dense) gets a contiguous gradient from contiguous copies. Values against float64 autograd."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 3, 4, 6, generator=g)
    y = 0.5 * x + torch.randn(2, 5, 3, 4, 6, generator=g)
    for kind, want_strides in ((1, _layout(x, 1).stride()), (0, x.stride()), (3, x.contiguous().stride())):
        a, b = _layout(x, kind), _layout(y, kind)
        ga, gb = cosine.cosine_bwd([a], [b], torch.ones(()), reduction="mean")
        assert ga[0].stride() == want_strides and gb[0].stride() == want_strides, kind
        xa, xb = x.double().requires_grad_(), y.double().requires_grad_()
        R.multilayer_cosine([xa], [xb]).backward()
        torch.testing.assert_close(ga[0].double(), xa.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(gb[0].double(), xb.grad, rtol=0, atol=1e-6)
