"""The loss study's configuration, torch-free: `deepsim-rt study --help` builds its parser from these fields
without importing torch (issue 20: 3.3 s at load 8 through evaluate.study). deepsim_rt.evaluate.study runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StudyConfig", "STUDY_LOSSES", "EVAL_SETS", "LABELS"]

# How each method is named in tables and plots (study tables, evaluate.figures.dice_boxplot).
LABELS = {"none": "no registration", "mse": "MSE", "ncc": "NCC", "ncc_sup": "NCC_sup", "vgg": "VGG",
          "deepsim_ae": "DeepSim_ae", "deepsim_seg": "DeepSim_seg"}

STUDY_LOSSES = ("mse", "ncc", "ncc_sup", "vgg", "deepsim_ae", "deepsim_seg")
EVAL_SETS = ("test", "real-2d")


@dataclass
class StudyConfig:
    """The loss study. The CPU default (small nets, 2D, short runs, Adam lr 1e-3 instead of the paper's 1e-4 so
    that a few hundred steps converge) finishes in minutes; `full=True` switches to the paper's network widths,
    lr 1e-4 and long runs (GPU-sized). Every training resumes from OUT when its checkpoint exists, so an
    interrupted study re-run with the same command continues where it stopped (finished runs are reused)."""

    data: str = field(default="default-2d", metadata={"help": "synthetic preset or NIfTI folder"})
    out: str = field(default="runs/study", metadata={"help": "output folder"})
    losses: str = field(default=",".join(STUDY_LOSSES), metadata={"help": "comma-separated losses to train"})
    preset: str = field(default="small", metadata={"help": "network preset (full: paper)"})
    feature_steps: int = field(default=400, metadata={"help": "steps per feature extractor"})
    reg_steps: int = field(default=600, metadata={"help": "steps per registration net"})
    batch_size: int = field(default=8, metadata={"help": "global batch size"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (CPU preset 1e-3; paper and --full 1e-4)"})
    lam_sweep: bool = field(default=False, metadata={"help": "train each loss at lambda x {1/4, 1, 4}, keep the best "
                                                             "validation Dice"})
    vgg_weights: str | None = field(default=None, metadata={"help": "ImageNet VGG16 weights (else VGG is skipped)"})
    seg_model: str | None = field(default=None, metadata={"help": "reuse this seg extractor instead of training"})
    ae_model: str | None = field(default=None, metadata={"help": "reuse this ae extractor instead of training"})
    weights_out: str | None = field(default=None, metadata={"help": "copy seg, ae and the DeepSim_seg reg net here "
                                                                    "as {seg,ae,reg}.safetensors"})
    eval_pairs: int = field(default=0, metadata={"help": "evaluate on the first N test pairs (0: all)"})
    eval: str = field(default="test", metadata={"help": "comma list of evaluation sets: test (the data's test "
                                                        "pairs), real-2d (12 real brain slice pairs, same contrast "
                                                        "and T2-like fixed; 2D data only; deepsim_rt.evaluate."
                                                        "real_slices)"})
    cache: str | None = field(default=None, metadata={"help": "real-brain cache folder for --eval real-2d "
                                                              "(default: DEEPSIM_RT_CACHE or the user cache)"})
    seed: int = field(default=0, metadata={"help": "seed"})
    full: bool = field(default=False, metadata={"help": "paper sizes: preset paper, lr 1e-4, 20000/20000 steps"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per training (0: torch's default; 1 was "
                                                      "fastest on the shared 2-core machine)"})

    def __post_init__(self) -> None:
        if self.full:
            self.preset, self.lr = "paper", 1e-4
            self.feature_steps, self.reg_steps = max(self.feature_steps, 20000), max(self.reg_steps, 20000)
        names = [s.strip() for s in self.losses.split(",") if s.strip()]
        bad = [n for n in names if n not in STUDY_LOSSES]
        if bad or not names:
            raise ValueError(f"unknown loss(es) {bad or names}; valid names: {', '.join(STUDY_LOSSES)}")
        if self.vgg_weights and not Path(self.vgg_weights).is_file():
            raise ValueError(f"VGG16 weights file not found: {self.vgg_weights!r}")
        for name in ("seg_model", "ae_model"):
            v = getattr(self, name)
            if v and not Path(v).is_file():
                raise ValueError(f"{name.replace('_', '-')} not found: {v!r}")
        if self.eval_pairs < 0:
            raise ValueError(f"eval_pairs must be >= 0, got {self.eval_pairs}")
        sets = self.eval_sets
        bad = [n for n in sets if n not in EVAL_SETS]
        if bad or not sets:
            raise ValueError(f"unknown evaluation set(s) {bad or sets}; valid names: {', '.join(EVAL_SETS)}")

    @property
    def eval_sets(self) -> list[str]:
        return [s.strip() for s in self.eval.split(",") if s.strip()]

    @property
    def loss_list(self) -> list[str]:
        return [s.strip() for s in self.losses.split(",") if s.strip()]
