"""Training: DeepSim feature extractors (seg / ae surrogate tasks) and registration networks.

    from deepsim_rt.train import FeatureTrainConfig, RegistrationTrainConfig, train_features, train_registration
    train_features(FeatureTrainConfig(task="seg", data="default-2d", out="runs/seg"))
    train_registration(RegistrationTrainConfig(loss="deepsim_seg", extractor="runs/seg/model.safetensors",
                                               out="runs/reg"))

Step-based loops with Adam, LR x0.1 on plateau, validation Dice, resumable atomic safetensors checkpoints, and
DistributedDataParallel under torchrun (deepsim_rt.train.loop).
"""

# Names resolve on first use (PEP 562): `deepsim-rt demo/evaluate-changes/train-* --help` import this package for
# train/cli.py's argparse helpers, and the training modules import torch (1.8-2.7 s idle, 16-22 s under load).
_LAZY = {"FeatureTrainConfig": "config", "RegistrationTrainConfig": "config", "DEFAULT_LAMBDAS": "config",
         "default_lambda": "config", "train_features": "features", "train_registration": "registration",
         "build_loss": "registration", "load_train_state": "state", "save_train_state": "state"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
