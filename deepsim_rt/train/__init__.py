"""Training: DeepSim feature extractors (seg / ae surrogate tasks) and registration networks.

    from deepsim_rt.train import FeatureTrainConfig, RegistrationTrainConfig, train_features, train_registration
    train_features(FeatureTrainConfig(task="seg", data="default-2d", out="runs/seg"))
    train_registration(RegistrationTrainConfig(loss="deepsim_seg", extractor="runs/seg/model.safetensors",
                                               out="runs/reg"))

Step-based loops with Adam, LR x0.1 on plateau, validation Dice, resumable atomic safetensors checkpoints, and
DistributedDataParallel under torchrun (deepsim_rt.train.loop).
"""

from deepsim_rt.train.config import DEFAULT_LAMBDAS, FeatureTrainConfig, RegistrationTrainConfig, default_lambda
from deepsim_rt.train.features import train_features
from deepsim_rt.train.registration import build_loss, train_registration
from deepsim_rt.train.state import load_train_state, save_train_state

__all__ = [
    "FeatureTrainConfig", "RegistrationTrainConfig", "DEFAULT_LAMBDAS", "default_lambda", "train_features",
    "train_registration", "build_loss", "load_train_state", "save_train_state",
]
