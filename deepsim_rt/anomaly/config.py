"""`deepsim-rt evaluate-changes` configuration, torch-free: its parser is built from these fields, and
`deepsim-rt evaluate-changes --help` must not import torch (issue 20: 1-3 s idle, 16-22 s under load)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChangeEvalConfig", "MAX_CASES"]

# `--n-cases 100000` ran unchecked and silent for 504 s and 1.4 GB (issue 20 item 7; ~5 ms and ~14 KB per 2D
# case, 3D far more): every case's score maps are kept for the ROC. The cases cycle the split's subjects with new
# change draws, and the largest split has 32 subjects (default-2d), so 1000 cases is 31 draws per subject.
MAX_CASES = 1000


@dataclass
class ChangeEvalConfig:
    """What `deepsim-rt evaluate-changes` runs (CLI options come from these fields)."""

    data: str = field(default="default-2d", metadata={"help": "synthetic data preset of the benchmark (its grid, "
                                                              "subjects and splits), e.g. default-2d, default-3d"})
    split: str = field(default="test", metadata={"help": "subjects of this split (tune on val, report test)"})
    n_cases: int | None = field(default=None, metadata={"help": "cases; None: one per subject of the split"})
    seed: int = field(default=0, metadata={"help": "seed of the change draws"})
    model: str | None = field(default=None, metadata={"help": "DeepSim-trained registration model; None: the "
                                                                "bundled default-2d / default-3d"})
    mse_model: str | None = field(default=None, metadata={"help": "MSE-trained registration model; None: "
                                                                    "reg_mse.safetensors beside --model"})
    extractor: str | None = field(default=None, metadata={"help": "feature extractor; None: seg.safetensors beside "
                                                                    "--model"})
    smooth: float = field(default=0.0, metadata={"help": "Gaussian sigma (voxels) applied to every score map "
                                                         "before the AUC (0: none)"})
    out: str = field(default="runs/changes", metadata={"help": "output folder: results.json, results.md, "
                                                               "changes_auc.png"})

    def __post_init__(self) -> None:
        n = self.n_cases
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CASES):
            raise ValueError(f"n_cases must be None (one per subject) or an int in 1..{MAX_CASES} (each case is "
                             f"registered twice and scored in memory), got {n!r}")
        if str(self.out).strip() == "":
            raise ValueError("out must name a folder, got ''")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int | float) or not self.smooth >= 0:
            raise ValueError(f"smooth must be a number >= 0 (voxels), got {self.smooth!r}")

    def benchmark(self):
        """The data.changes.ChangeBenchmarkConfig of these cases."""
        from deepsim_rt.data.changes import ChangeBenchmarkConfig

        return ChangeBenchmarkConfig(data=self.data, split=self.split, n_cases=self.n_cases, seed=self.seed)
