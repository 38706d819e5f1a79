"""VGG16 feature extractor (conv layers up to relu3_3) in plain torch, for the paper's 2D "VGG" baseline.

No torchvision (not installable beside our torch) and no download: the ImageNet weights come from a file the user
gives, with torchvision's key names (`features.N.weight` / `features.N.bias`). Convert them once on a machine that
has torchvision:

    import torchvision, safetensors.torch
    sd = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()
    safetensors.torch.save_file({k: v for k, v in sd.items() if k.startswith("features.")}, "vgg16.safetensors")
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from deepsim_rt._checks import check_finite, check_float, check_spatial_ndim, check_tensor

__all__ = ["VGGFeatures", "VGG_FEATURE_LAYERS"]

# torchvision's vgg16().features indices: conv at 0,2 | pool 4 | conv 5,7 | pool 9 | conv 10,12,14 | ...
_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256)}
_POOLS = (4, 9)
# Index of the ReLU whose output is taken: relu1_2 = features[3], relu2_2 = features[8], relu3_3 = features[15].
VGG_FEATURE_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15}
# Keys of a full torchvision VGG16 state dict that we do not use (deeper convs, classifier): tolerated in the file.
_OTHER_VGG16_KEY = re.compile(r"^(features\.(17|19|21|24|26|28)|classifier\.(0|3|6))\.(weight|bias)$")


class VGGFeatures(nn.Module):
    """VGG16 relu1_2 / relu2_2 / relu3_3 (2D only), the levels the paper's VGG baseline compares.

    Args:
        weights_path: `.safetensors` (preferred) or `.pth`/`.pt` state dict with torchvision key names; `.pth` is
            read with torch.load(weights_only=True) only (never unpickles arbitrary objects). Every conv weight and
            bias up to features.14 must be present with its exact shape; other keys of a full VGG16 (deeper
            features, classifier) are ignored, anything else is an error.
        random_init: must be passed explicitly to build an UNTRAINED network (tests); its features are not
            ImageNet features.
    `extract_features(x)`: x (B, 1 or 3, H, W) float; grayscale is copied to 3 channels; NO ImageNet mean/std
    normalization (as the DeepSim code). Returns [(B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4)]
    (floor division by the 2x2 max pools).
    """

    def __init__(self, weights_path: str | Path | None = None, *, random_init: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(16):
            if i in _CONVS:
                layers.append(nn.Conv2d(*_CONVS[i], kernel_size=3, padding=1))
            elif i in _POOLS:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.ReLU(inplace=False))
        # Named `features` so that state-dict keys are exactly torchvision's `features.N.*`.
        self.features = nn.Sequential(*layers)
        if weights_path is not None and random_init:
            raise ValueError("pass either weights_path or random_init=True, not both")
        if weights_path is None and not random_init:
            raise ValueError("VGGFeatures needs ImageNet VGG16 weights: pass weights_path= a .safetensors (or .pth) "
                             "file with torchvision's features.N.weight/bias keys (see the deepsim_rt.losses.vgg "
                             "module docstring for a one-off conversion); they cannot be downloaded here. Use "
                             "random_init=True only for tests: untrained features are not the paper's VGG baseline.")
        self.weights_path = None if weights_path is None else str(weights_path)
        if weights_path is not None:
            self.load_weights(weights_path)

    def load_weights(self, path: str | Path) -> None:
        """Load conv weights from `path` (strict key/shape check, no pickle).

        Raises ValueError for a missing, corrupt or mismatched file (the CLI reports ValueError as one clear line).
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"VGG16 weights file not found: {path}")
        suffix = path.suffix.lower()
        try:
            if suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            elif suffix in (".pth", ".pt"):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            else:
                raise ValueError(f"VGG16 weights must be a .safetensors or .pth/.pt file, got {path.name!r}")
        except ValueError:
            raise
        except Exception as exc:  # corrupt / truncated / pickled-object files all land here
            raise ValueError(f"could not read VGG16 weights from {path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{path} must hold a flat state dict (str -> Tensor), got {type(state).__name__}")
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own and not _OTHER_VGG16_KEY.match(k))
        bad_shape = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                     for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or bad_shape:
            raise ValueError(f"{path} is not a VGG16 state dict with torchvision key names: missing {missing}, "
                             f"unexpected {unexpected}, wrong shapes {bad_shape}")
        for k, v in state.items():
            if k in own and not v.is_floating_point():
                raise ValueError(f"{path}: {k} must be floating point, got dtype {v.dtype}")
        self.load_state_dict({k: state[k] for k in own}, strict=True)

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 1 or 3, H, W) float -> [relu1_2 (B,64,H,W), relu2_2 (B,128,H/2,W/2), relu3_3 (B,256,H/4,W/4)]."""
        check_tensor("x", x)
        check_spatial_ndim("x", x, allowed=(2,))
        check_float("x", x)
        check_finite("x", x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"VGG16 takes 1 (grayscale, copied to RGB) or 3 channels, got {x.shape[1]} (shape "
                             f"{tuple(x.shape)})")
        if x.shape[2] < 4 or x.shape[3] < 4:
            raise ValueError(f"VGG16 features need H, W >= 4 (two 2x2 pools), got {tuple(x.shape[2:])}")
        x = x.to(self.features[0].weight.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_FEATURE_LAYERS.values():
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.extract_features(x)
