"""Training configurations (one dataclass per job; the CLI derives its options and defaults from these fields).

Both jobs are step-based: `steps` optimizer steps over a shuffled, seeded stream of training items, validation
every `val_every` steps, a resumable checkpoint every `checkpoint_every` steps (and at the end).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from deepsim_rt.losses.names import SIMILARITIES

__all__ = ["FeatureTrainConfig", "RegistrationTrainConfig", "DEFAULT_LAMBDAS", "default_lambda", "TASKS"]

TASKS = ("seg", "ae")
NET_PRESETS = ("paper", "small", "tiny")

# Regularization weight per loss for the bundled synthetic brain data (intensities minmax-scaled to [0, 1]).
# Chosen by `deepsim-rt study --lam-sweep` on default-2d (see deepsim_rt/weights/README.md): the paper's values
# were tuned for its own data (PAPER_NOTES: "different data need their own lambda").
DEFAULT_LAMBDAS: dict[str, float] = {
    "mse": 0.02,
    "ncc": 0.5,
    "ncc_sup": 0.5,
    "vgg": 0.5,
    "deepsim_seg": 0.5,
    "deepsim_ae": 0.5,
    # MIND-SSC: not swept. Measured on 6 synth-2d validation pairs: unregistered MIND 0.16-0.19 vs NCC 0.77-0.85,
    # an image vs itself shifted 1 voxel 0.033-0.058 vs 0.18-0.51: about 1/5 of NCC's scale, so NCC's 0.5 / 5.
    "mind": 0.1,
}


def default_lambda(loss: str) -> float:
    """The default lambda of `loss` on the bundled synthetic data (DEFAULT_LAMBDAS)."""
    if loss not in DEFAULT_LAMBDAS:
        raise ValueError(f"unknown loss {loss!r}; valid names: {', '.join(SIMILARITIES)}")
    return DEFAULT_LAMBDAS[loss]


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class _Common:
    """Fields shared by both jobs."""

    data: str = field(default="default-2d", metadata=_h(
        "synthetic preset (tiny-2d, default-2d, tiny-3d, default-3d = 2 mm, default-3d-4mm) or a NIfTI folder "
        "(images/ + labels/)"))
    out: str = field(default="runs/train", metadata=_h("output folder: model.safetensors, checkpoint.safetensors, "
                                                       "history.json"))
    preset: str = field(default="small", metadata=_h("network size preset: paper, small or tiny"))
    steps: int = field(default=1000, metadata=_h("total optimizer steps (resuming continues up to this count)"))
    batch_size: int = field(default=8, metadata=_h("GLOBAL batch size (split evenly over torchrun processes)"))
    lr: float = field(default=1e-4, metadata=_h("Adam learning rate (paper: 1e-4)"))
    plateau_factor: float = field(default=0.1, metadata=_h("LR multiplier when the validation loss plateaus"))
    plateau_patience: int = field(default=4, metadata=_h("validations without improvement before the LR drops"))
    val_every: int = field(default=100, metadata=_h("validate every N steps (and at the end)"))
    val_items: int = field(default=16, metadata=_h("validation items (subjects or pairs) used per validation"))
    checkpoint_every: int = field(default=100, metadata=_h("write the resumable checkpoint every N steps"))
    seed: int = field(default=0, metadata=_h("seed of initialization, data order and augmentation"))
    resume: bool = field(default=False, metadata=_h("continue from OUT/checkpoint.safetensors if it exists"))
    progress: bool = field(default=True, metadata=_h("show a progress bar (rank 0 only)"))
    threads: int = field(default=0, metadata=_h("torch CPU threads per process (0: leave torch's default)"))
    crop: int = field(default=0, metadata=_h("train on random CROP^ndim windows (same window for an image and its "
                                             "labels / a pair), a multiple of the net's 2**stages; 0: whole "
                                             "images. Validation always sees whole images"))
    keep_models: bool = field(default=False, metadata=_h("also write model_step<N>.safetensors at every "
                                                         "validation (select the best on validation Dice)"))
    init: str | None = field(default=None, metadata=_h("start from this model .safetensors (same architecture; "
                                                       "e.g. a 4 mm net to start 2 mm training) instead of random"))

    def _check_common(self) -> None:
        if self.preset not in NET_PRESETS:
            raise ValueError(f"preset must be one of {NET_PRESETS}, got {self.preset!r}")
        for name in ("steps", "batch_size", "val_every", "val_items", "checkpoint_every", "plateau_patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "plateau_patience" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 0:
            raise ValueError(f"crop must be an int >= 0 voxels, got {self.crop!r}")

    # Fields that may change between a run and its resumption (everything else must match the checkpoint).
    RESUMABLE_CHANGES = ("out", "steps", "resume", "progress", "threads", "val_every", "checkpoint_every",
                         "keep_models")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**d)


@dataclass
class FeatureTrainConfig(_Common):
    """Train a DeepSim feature extractor on a surrogate task (paper: segmentation or autoencoding).

    seg: cross-entropy on the label maps; ae: MSE reconstruction through the sigmoid head (no skips).
    Augmentation (paper): random affine (rotation, scaling, shear, translation) + left/right flip, drawn per sample
    from a generator seeded by (seed, epoch, index); a flip also swaps left/right label values where the data set
    names them (the bundled atlas does).
    """

    task: str = field(default="seg", metadata=_h("surrogate task: seg (supervised) or ae (autoencoder)"))
    augment: bool = field(default=True, metadata=_h("random affine + flip augmentation (paper)"))
    dropout: float = field(default=0.5, metadata=_h("channel dropout after each U-Net stage (paper: 0.5)"))
    out: str = field(default="runs/features", metadata=_h("output folder"))

    def __post_init__(self) -> None:
        self._check_common()
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class RegistrationTrainConfig(_Common):
    """Train a registration network (RegNet) with one similarity + lambda * diffusion regularizer.

    loss: mse, ncc, ncc_sup, vgg (2D, needs vgg_weights), deepsim_seg / deepsim_ae (need `extractor`, a trained
    feature model of the matching kind, frozen and in eval mode inside the loss).
    lam: regularization weight (>= 0); None = DEFAULT_LAMBDAS[loss].
    """

    loss: str = field(default="deepsim_seg", metadata=_h(f"similarity: {', '.join(SIMILARITIES)}"))
    lam: float | None = field(default=None, metadata=_h("regularization weight >= 0 (default: per loss, "
                                                         "DEFAULT_LAMBDAS)"))
    extractor: str | None = field(default=None, metadata=_h("feature model .safetensors for deepsim_seg / "
                                                            "deepsim_ae (from train-features)"))
    vgg_weights: str | None = field(default=None, metadata=_h("ImageNet VGG16 weights file for --loss vgg"))
    integrate_steps: int = field(default=0, metadata=_h("0: plain displacement (paper); >0: scaling-and-squaring "
                                                        "steps of a velocity (diffeomorphic)"))
    padding: str = field(default="border", metadata=_h("warp padding: border (DeepSim code) or zeros (VoxelMorph)"))
    out: str = field(default="runs/registration", metadata=_h("output folder"))

    def __post_init__(self) -> None:
        self._check_common()
        if self.loss not in SIMILARITIES:
            raise ValueError(f"unknown loss {self.loss!r}; valid names: {', '.join(SIMILARITIES)}")
        if self.lam is None:
            self.lam = default_lambda(self.loss)
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or not math.isfinite(self.lam) \
                or self.lam < 0:
            raise ValueError(f"lam (regularization weight) must be a finite number >= 0, got {self.lam!r}")
        self.lam = float(self.lam)
        if self.loss in ("deepsim_seg", "deepsim_ae") and not self.extractor:
            raise ValueError(f"--loss {self.loss} needs --extractor: a {self.loss.split('_')[1]} feature model "
                             "trained by `deepsim-rt train-features`")
        if self.loss == "vgg" and not self.vgg_weights:
            raise ValueError("--loss vgg needs --vgg-weights FILE (ImageNet VGG16 weights; they cannot be "
                             "downloaded here)")
        if self.loss not in ("deepsim_seg", "deepsim_ae") and self.extractor:
            raise ValueError(f"--extractor is only used by deepsim_seg / deepsim_ae, got it with --loss {self.loss}")
        if not isinstance(self.integrate_steps, int) or self.integrate_steps < 0:
            raise ValueError(f"integrate_steps must be an int >= 0, got {self.integrate_steps!r}")
        if self.padding not in ("border", "zeros"):
            raise ValueError(f"padding must be 'border' or 'zeros', got {self.padding!r}")
