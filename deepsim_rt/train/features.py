"""Feature-extractor training on a surrogate task (DeepSim_seg: segmentation; DeepSim_ae: autoencoding).

    summary = train_features(FeatureTrainConfig(task="seg", data="default-2d", out="runs/seg"))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepsim_rt.evaluate.metrics import dice_foreground
from deepsim_rt.nn import NetConfig, build_model
from deepsim_rt.train.config import FeatureTrainConfig
from deepsim_rt.train.data import item_generator, open_source, pad_to_multiple, random_affine_flip, random_crop
from deepsim_rt.train.distributed import DistInfo, all_reduce_sum
from deepsim_rt.train.loop import run_job

__all__ = ["FeatureJob", "train_features"]


class FeatureJob:
    """seg: cross-entropy of the class logits; ae: MSE of the sigmoid reconstruction (validation: same losses;
    seg also reports the foreground Dice of the argmax segmentation)."""

    def __init__(self, cfg: FeatureTrainConfig) -> None:
        self.cfg = cfg
        self.name = f"features-{cfg.task}"
        self.source = open_source(cfg.data)
        self.device = torch.device("cpu")

    def setup(self, info: DistInfo) -> None:
        self.device = info.device

    def build_model(self) -> torch.nn.Module:
        src, cfg = self.source, self.cfg
        kw = {"n_classes": src.n_classes, "label_names": src.label_names} if cfg.task == "seg" else {}
        self.net_cfg = NetConfig.make(cfg.task, src.ndim, cfg.preset, dropout=cfg.dropout, intensity=src.intensity,
                                      **kw)
        return build_model(self.net_cfg)

    def num_items(self) -> int:
        return self.source.size("train")

    def _stack(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        m = self.net_cfg.spatial_multiple
        image = pad_to_multiple(torch.stack([a for a, _ in items]), m).to(self.device)
        labels = pad_to_multiple(torch.stack([b for _, b in items]), m).to(self.device)
        return {"image": image, "labels": labels}

    def make_batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        items = []
        for i in indices:
            image, labels = self.source.subject("train", i)
            if self.cfg.augment:
                image, labels = random_affine_flip(image, labels, item_generator(self.cfg.seed, epoch, i),
                                                   self.source.mirror_labels)
            if self.cfg.crop:
                image, labels = random_crop([image, labels], self.cfg.crop,
                                            item_generator(self.cfg.seed, epoch, i, stream=2))
            items.append((image, labels))
        return self._stack(items)

    def _loss(self, model, batch) -> torch.Tensor:
        if self.cfg.task == "seg":
            return F.cross_entropy(model(batch["image"]), batch["labels"][:, 0])
        return F.mse_loss(model(batch["image"]), batch["image"])

    def loss(self, model, batch) -> torch.Tensor:
        return self._loss(model, batch)

    def validate(self, model, info: DistInfo) -> dict[str, float]:
        n = min(self.cfg.val_items, self.source.size("val"))
        mine = list(range(info.rank, n, info.world))
        loss_sum, dice_sum, dice_n = 0.0, 0.0, 0.0
        for i in mine:
            batch = self._stack([self.source.subject("val", i)])
            loss_sum += float(self._loss(model, batch))
            if self.cfg.task == "seg":
                pred = model(batch["image"]).argmax(1, keepdim=True)
                d = float(dice_foreground(pred, batch["labels"], self.source.n_classes)[0])
                if d == d:  # NaN: no foreground in either map
                    dice_sum, dice_n = dice_sum + d, dice_n + 1
        loss_sum, count, dice_sum, dice_n = all_reduce_sum([loss_sum, float(len(mine)), dice_sum, dice_n], info)
        out = {"loss": loss_sum / max(count, 1.0)}
        if self.cfg.task == "seg":
            out["dice"] = dice_sum / max(dice_n, 1.0)
        return out


def train_features(cfg: FeatureTrainConfig) -> dict:
    """Train a feature extractor; returns the summary of `deepsim_rt.train.loop.run_job`."""
    return run_job(FeatureJob(cfg))
