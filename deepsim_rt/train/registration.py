"""Registration training: RegNet with one similarity + lambda * diffusion regularizer.

    summary = train_registration(RegistrationTrainConfig(loss="deepsim_seg", extractor="runs/seg/model.safetensors",
                                                         data="default-2d", out="runs/reg"))

Training items: item i pairs training subject i (moving) with a fixed subject j != i drawn from the item's seeded
generator, so every epoch sees new pairs. Validation: the data set's seeded validation pairs (loss and foreground
Dice of the moving labels warped with nearest).
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepsim_rt.evaluate.metrics import dice_foreground
from deepsim_rt.kernels import warp
from deepsim_rt.losses import build_similarity, diffusion_regularizer, one_hot
from deepsim_rt.nn import NetConfig, build_model, load_model
from deepsim_rt.train.config import RegistrationTrainConfig
from deepsim_rt.train.data import item_generator, open_source, pad_to_multiple, random_crop
from deepsim_rt.train.distributed import DistInfo, all_reduce_sum
from deepsim_rt.train.loop import run_job

__all__ = ["RegistrationJob", "train_registration", "build_loss"]


def build_loss(loss: str, ndim: int, extractor: str | None = None, vgg_weights: str | None = None,
               device: torch.device | str = "cpu"):
    """The similarity module for `loss` on `ndim`-D data, with clear errors for missing or mismatched models."""
    if loss in ("deepsim_seg", "deepsim_ae"):
        kind = loss.split("_")[1]
        if not extractor:
            raise ValueError(f"loss {loss} needs a trained {kind} feature model (extractor=...)")
        if not Path(extractor).is_file():
            raise ValueError(f"feature model not found: {extractor!r}")
        model = load_model(extractor, map_location=device)
        if model.cfg.kind != kind:
            raise ValueError(f"loss {loss} needs a {kind} feature model, {extractor!r} is a {model.cfg.kind} model")
        if model.cfg.ndim != ndim:
            raise ValueError(f"the feature model {extractor!r} is {model.cfg.ndim}D, the data are {ndim}D")
        return build_similarity(loss, extractor=model)
    if loss == "vgg":
        if ndim != 2:
            raise ValueError(f"the VGG similarity is 2D only, the data are {ndim}D")
        if not vgg_weights or not Path(vgg_weights).is_file():
            raise ValueError(f"VGG16 weights file not found: {vgg_weights!r} (ImageNet weights cannot be downloaded "
                             "here; convert them once as the deepsim_rt.losses.vgg docstring shows)")
        return build_similarity("vgg", weights_path=vgg_weights).to(device)
    return build_similarity(loss)


class RegistrationJob:
    def __init__(self, cfg: RegistrationTrainConfig) -> None:
        self.cfg = cfg
        self.name = f"registration-{cfg.loss}"
        self.source = open_source(cfg.data)
        self.device = torch.device("cpu")
        # Fail on bad input before any training: unknown loss / missing files / dimension mismatch.
        self.sim = build_loss(cfg.loss, self.source.ndim, cfg.extractor, cfg.vgg_weights)

    def setup(self, info: DistInfo) -> None:
        self.device = info.device
        self.sim = self.sim.to(info.device)

    def build_model(self) -> torch.nn.Module:
        src, cfg = self.source, self.cfg
        self.net_cfg = NetConfig.make("reg", src.ndim, cfg.preset, integrate_steps=cfg.integrate_steps,
                                      padding=cfg.padding, label_names=src.label_names, intensity=src.intensity)
        return build_model(self.net_cfg)

    def num_items(self) -> int:
        n = self.source.size("train")
        if n < 2:
            raise ValueError(f"registration training needs >= 2 training subjects, got {n}")
        return n

    def _stack(self, split: str, pairs: list[tuple[int, int]], crops: list | None = None) -> dict[str, torch.Tensor]:
        """Pad (and with `crops`, one generator per pair, cut the same random window from both images) and stack."""
        m = self.net_cfg.spatial_multiple
        # source.pair: subject + subject, or (synthesis) a pair rendered from one base label map.
        both = [self.source.pair(split, a, b) for a, b in pairs]
        mov = [x for x, _ in both]
        fix = [y for _, y in both]
        if crops is not None:
            for k, g in enumerate(crops):
                mi, ml, fi, fl = random_crop([*mov[k], *fix[k]], self.cfg.crop, g)
                mov[k], fix[k] = (mi, ml), (fi, fl)
        st = lambda xs, k: pad_to_multiple(torch.stack([x[k] for x in xs]), m).to(self.device)
        return {"moving": st(mov, 0), "moving_labels": st(mov, 1), "fixed": st(fix, 0), "fixed_labels": st(fix, 1)}

    def make_batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        n = self.source.size("train")
        pairs = []
        for i in indices:
            j = int(torch.randint(n - 1, (), generator=item_generator(self.cfg.seed, epoch, i, stream=1)))
            pairs.append((i, j + (j >= i)))  # j != i
        crops = [item_generator(self.cfg.seed, epoch, i, stream=2) for i in indices] if self.cfg.crop else None
        return self._stack("train", pairs, crops)

    def _loss(self, model, batch) -> torch.Tensor:
        warped, u = model(batch["moving"], batch["fixed"])
        ws = fs = None
        if self.sim.needs_labels:
            k = self.source.n_classes
            ws = warp(one_hot(batch["moving_labels"], k), u, mode="linear", padding=self.cfg.padding)
            fs = one_hot(batch["fixed_labels"], k)
        return self.sim(warped, batch["fixed"], ws, fs) + self.cfg.lam * diffusion_regularizer(u)

    def loss(self, model, batch) -> torch.Tensor:
        return self._loss(model, batch)

    def validate(self, model, info: DistInfo) -> dict[str, float]:
        pairs = self.source.pairs("val")[: self.cfg.val_items]
        mine = pairs[info.rank::info.world]
        loss_sum, dice_sum, dice_n = 0.0, 0.0, 0.0
        for p in mine:
            batch = self._stack("val", [p])
            loss_sum += float(self._loss(model, batch))
            _, u = model(batch["moving"], batch["fixed"])
            warped_labels = warp(batch["moving_labels"], u, mode="nearest", padding=self.cfg.padding)
            d = float(dice_foreground(warped_labels, batch["fixed_labels"], self.source.n_classes)[0])
            if d == d:
                dice_sum, dice_n = dice_sum + d, dice_n + 1
        loss_sum, count, dice_sum, dice_n = all_reduce_sum([loss_sum, float(len(mine)), dice_sum, dice_n], info)
        return {"loss": loss_sum / max(count, 1.0), "dice": dice_sum / max(dice_n, 1.0)}


def train_registration(cfg: RegistrationTrainConfig) -> dict:
    """Train a registration network; returns the summary of `deepsim_rt.train.loop.run_job`."""
    return run_job(RegistrationJob(cfg))
