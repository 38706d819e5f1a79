"""One optimisation step of the registration net per similarity loss, reference ops vs the kernels, + peak memory.

step = forward (RegNet: U-Net -> displacement -> warp) + loss (similarity + lambda * diffusion regularizer)
       + backward + Adam update; the moving/fixed batch is data (no gradient), as in registration training.
Providers: "reference" (every deepsim_rt module's hot ops swapped to deepsim_rt.kernels.reference for the run)
and "kernels" (the public ops: Triton on CUDA). On the CPU both are the same code, so only "reference" runs there.
Losses: mse, ncc (window 9), deepsim_seg and deepsim_ae (frozen feature extractors of the same preset as the net;
random weights: the cost does not depend on them). Peak memory: extra_info["peak_mem_bytes"] of one untimed step
(GPU: torch.cuda.max_memory_allocated above the resting level; CPU: sampled RSS delta, an estimate).
Sizes: benchmarks/shapes.py TRAIN_SIZES.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import bench_device, shape_str, use_provider
from benchmarks.shapes import TRAIN_SIZES

DEV = bench_device()
ON_GPU = DEV.type == "cuda"
LOSSES = ("mse", "ncc", "deepsim_seg", "deepsim_ae")
PROVIDERS = ("reference", "kernels")
LAMBDA = 1.0  # the regularizer's weight does not change the cost


def _cases() -> list:
    out = []
    for nd in sorted(TRAIN_SIZES[DEV.type], reverse=True):  # 3D first: a time box cuts the tail
        preset, batch, spatial = TRAIN_SIZES[DEV.type][nd]
        for loss in LOSSES:
            for prov in PROVIDERS:
                marks = [pytest.mark.gpu] if (ON_GPU or prov == "kernels") else []
                out.append(pytest.param(nd, preset, batch, spatial, loss, prov, marks=marks,
                                        id=f"{nd}d-{loss}-{prov}"))
    return out


def _similarity(loss: str, nd: int, preset: str):
    from deepsim_rt.losses import build_similarity
    from deepsim_rt.nn import AutoEncoder, NetConfig, SegNet

    if loss == "deepsim_seg":
        extractor = SegNet(NetConfig.make("seg", nd, preset, n_classes=7))
        return build_similarity(loss, extractor=extractor)
    if loss == "deepsim_ae":
        return build_similarity(loss, extractor=AutoEncoder(NetConfig.make("ae", nd, preset)))
    return build_similarity(loss)


@pytest.mark.parametrize("nd,preset,batch,spatial,loss,provider", _cases())
def test_train_step(bench, nd, preset, batch, spatial, loss, provider):
    if provider == "kernels" and not ON_GPU:
        pytest.skip("on the CPU the public ops ARE the reference")
    from deepsim_rt.losses import diffusion_regularizer
    from deepsim_rt.nn import NetConfig, RegNet

    torch.manual_seed(0)
    net = RegNet(NetConfig.make("reg", nd, preset)).to(DEV).train()
    sim = _similarity(loss, nd, preset).to(DEV)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    seed = iter(range(1000))

    def make():
        g = torch.Generator().manual_seed(next(seed))
        mov = torch.rand((batch, 1, *spatial), generator=g).to(DEV)
        fix = torch.rand((batch, 1, *spatial), generator=g).to(DEV)
        return mov, fix

    def step(mov, fix):
        warped, flow = net(mov, fix)
        total = sim(warped, fix) + LAMBDA * diffusion_regularizer(flow)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.detach()

    with use_provider(provider):
        m0, f0 = make()
        bench.run(step, make, op=f"train{nd}d-{loss}", pass_="step", provider=provider,
                  shape=shape_str((batch, 1, *spatial)), dtype="float32", rotate=False,
                  memory=lambda: step(m0, f0),
                  extra={"preset": preset, "loss": loss})
