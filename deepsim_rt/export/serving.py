"""Serving graphs: raw images of any size in, registered images out, with every pre/post step inside the graph.

    ServingModule(regnet)   (moving, fixed) raw float32 (B, C, *S), any S  ->  (warped (B, C, *S) in the moving
                            image's own intensity units, displacement (B, ndim, *S) voxels)

What the graph does (exactly what `deepsim_rt.runtime.Registrator.register` does around a network, so the two agree
to fp32 rounding):
  1. per-sample normalization of each image (over channels and voxels) to [0, 1] by the network's input contract
     (cfg.intensity, deepsim_rt.nn.intensity): "minmax" (min and max) or "percentile" (0.5 / 99.5 % percentiles
     by bisection, clipped); a constant sample becomes all zeros;
  2. padding of every spatial axis to the next multiple of the network's multiple (2**stages), split evenly
     before / after; "replicate" padding when the model warps with border padding, zeros otherwise;
  3. the network (U-Net, flow head, optional scaling-and-squaring integration) and the warp of the padded,
     normalized moving image;
  4. the crop back to the input size, and the warped image mapped back to the moving image's range
     (warped * scale + lo: (max - min) and min, or (p99.5 - p0.5) and p0.5).
The pad amounts are computed from the (symbolic) input shape, so one exported graph serves every size from m + 1
to 8192 per axis (m the network multiple; a padded axis of m would leave a one-voxel coarsest level, which the
network's traced shape guards exclude): no multiple-of-8 condition, no Python before or after it.

Feeding a "minmax" serving graph an already normalized, already padded pair gives the network's own output bit for
bit (min 0 and max 1 normalize to themselves, zero padding is no padding), which is why the runtime can run those
through the same `register` path as network-only ("minmax") artifacts. Percentiles are not idempotent (the
interpolated p0.5 of a normalized image is a fraction of one order-statistic gap above 0, and padding changes the
counts), so the runtime hands a "percentile" serving graph the raw, unpadded images instead (runtime.register).

`CONTRACT` is the input/output contract in words, written into every artifact's metadata.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsim_rt.nn.intensity import minmax_normalize, normalize  # one definition for training, runtime and graphs

__all__ = ["ServingModule", "minmax_normalize", "serving_pad", "serving_crop", "CONTRACT", "contract_text"]

# Metadata keys stating the contract in words (the ONNX metadata_props a deployment engineer reads in Netron).
CONTRACT = {
    "displacement_convention": "warped(p) = moving(p + displacement(p)); displacement channel i moves along spatial "
                               "axis i of the (B, C, D, H, W) / (B, C, H, W) tensor (tensor order, not x/y/z); "
                               "linear interpolation, align_corners=True voxel centres",
    "displacement_units": "voxels of the input grid (not mm, not normalized [-1, 1] coordinates)",
    "channel_order": "inputs and outputs are NC(D)HW: batch, channel, then spatial axes in array order; "
                     "displacement channels follow the spatial axes in that same order",
}


def contract_text(intensity: str, multiple: int, network_intensity: str = "minmax") -> dict[str, str]:
    """CONTRACT plus the intensity and size contract of an artifact whose input intensity is `intensity` ("raw"
    for a serving graph, else the network's own), for a network whose contract is `network_intensity`."""
    if intensity == "raw":
        how = ("min-max normalizes each sample itself" if network_intensity == "minmax" else
               "percentile-normalizes each sample itself ((x - p0.5) / (p99.5 - p0.5) clipped to [0, 1], "
               "percentiles over channels and voxels)")
        words = (f"raw float32 intensities in any units; the graph {how} and maps 'warped' back to the moving "
                 "image's own range")
        sizes = (f"any spatial size from {multiple + 1} to 8192 per axis (the graph pads to a multiple of {multiple} "
                 "and crops back)")
    elif intensity == "percentile":
        words = ("float32 inputs already percentile-normalized per sample by the caller: (x - p0.5) / (p99.5 - "
                 "p0.5) clipped to [0, 1], the 0.5 and 99.5 % percentiles (torch.quantile 'linear') over channels "
                 "and voxels (deepsim_rt.nn.intensity.percentile_normalize); raw intensities give meaningless "
                 "displacements; 'warped' is in [0, 1] units")
        sizes = f"every spatial size a multiple of {multiple} (the caller pads and crops)"
    else:
        words = ("float32 images already min-max normalized per sample to [0, 1] by the caller (x - min) / "
                 "(max - min); raw intensities give meaningless displacements; 'warped' is in [0, 1] units")
        sizes = f"every spatial size a multiple of {multiple} (the caller pads and crops)"
    return {**CONTRACT, "intensity_contract": words, "size_contract": sizes}


def _pads(x: torch.Tensor, multiple: int) -> list[tuple]:
    # (before, after) per spatial axis from the possibly symbolic sizes: padded = ceil(n / m) * m, split evenly
    # (before = total // 2), as runtime.pad_amounts does with Python ints. Written with floor divisions only (no
    # modulo): torch.export can then prove padded >= 2m from n >= m + 1, which the network's shape guards need.
    out = []
    for n in x.shape[2:]:
        total = (n + multiple - 1) // multiple * multiple - n
        out.append((total // 2, total - total // 2))
    return out


def serving_pad(x: torch.Tensor, multiple: int, mode: str) -> tuple[torch.Tensor, list[tuple]]:
    """Pad (B, C, *S) to multiples of `multiple` ("replicate" or "zeros"), as a gather along each axis.

    Padded index j reads input index clamp(j - before, 0, n - 1) (replicate) and is zeroed outside [0, n) for
    "zeros". Same values as F.pad, but with no branch on the pad amounts: F.pad makes torch.export specialize on
    whether an axis needs padding at all (guards like `n % 8 == 3`), which would pin the graph to one size class.
    """
    pads = _pads(x, multiple)
    for axis, ((before, after), n) in enumerate(zip(pads, x.shape[2:], strict=True)):
        src = torch.arange(n + before + after, device=x.device) - before
        idx = src.clamp(0, n - 1)
        x = x.index_select(2 + axis, idx)
        if mode == "zeros":
            keep = ((src >= 0) & (src < n)).to(x.dtype)
            x = x * keep.view(*([1] * (2 + axis)), -1, *([1] * (x.dim() - 3 - axis)))
    return x, pads


def serving_crop(x: torch.Tensor, pads: list[tuple], spatial: tuple) -> torch.Tensor:
    """Undo `serving_pad`: keep padded indices before .. before + n - 1 per axis (n the original size), as a
    gather: a slice would let torch.export branch on "nothing to crop" (guards like `8 * ceil(w / 8) != w`)."""
    for axis, ((before, _after), n) in enumerate(zip(pads, spatial, strict=True)):
        x = x.index_select(2 + axis, torch.arange(n, device=x.device) + before)
    return x


class ServingModule(nn.Module):
    """Raw images of any size -> (warped in the moving image's units, displacement in voxels); see the module doc.

    regnet: a RegNet (config kind "reg"), already prepared for export (wrappers.prepare_for_export) or not.
    """

    def __init__(self, regnet: nn.Module) -> None:
        super().__init__()
        self.net = regnet
        self.cfg = regnet.cfg
        self.multiple = int(regnet.cfg.spatial_multiple)
        self.pad_mode = "replicate" if regnet.cfg.padding == "border" else "zeros"
        self.intensity = regnet.cfg.intensity  # "minmax" | "percentile" (nn.intensity)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = tuple(moving.shape[2:])
        mov_n, lo, scale = normalize(moving, self.intensity)
        fix_n, _, _ = normalize(fixed, self.intensity)
        mov_p, pads = serving_pad(mov_n, self.multiple, self.pad_mode)
        fix_p, _ = serving_pad(fix_n, self.multiple, self.pad_mode)
        warped_p, disp_p = self.net(mov_p, fix_p)
        warped = serving_crop(warped_p, pads, spatial).to(moving.dtype) * scale + lo
        disp = serving_crop(disp_p, pads, spatial).to(moving.dtype)
        return warped, disp
