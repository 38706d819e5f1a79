"""benchmarks/roofline.py: the minimum bytes of each benchmarked op, for the shapes the suites use.

Every expected number below was worked out by hand (element counts x bytes per element, written out in the
comments), not by calling the function under test another way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


roofline = _load("roofline")
shapes = _load("shapes")


def _size(device: str, name: str):
    return next(s for s in shapes.KERNEL_SIZES[device] if s.name == name)


# ----------------------------------------------------------------------------------------------------------------
# Basics
# ----------------------------------------------------------------------------------------------------------------
def test_itemsize_and_tensor_bytes():
    assert roofline.itemsize("float32") == 4
    assert roofline.itemsize("torch.bfloat16") == 2
    assert roofline.itemsize("float16") == 2
    assert roofline.itemsize("float64") == 8
    assert roofline.tensor_bytes((2, 3, 5), "float32") == 120
    assert roofline.tensor_bytes((), "float32") == 4  # a 0-dim tensor is one element
    assert roofline.copy_bytes(1 << 28, "float32") == 2 << 30  # 1 GiB copied = 2 GiB moved


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown dtype"):
        roofline.itemsize("complex32")
    with pytest.raises(ValueError, match="pass must be one of"):
        roofline.warp_bytes((1, 1, 4, 4), "float32", "bwd")
    with pytest.raises(ValueError, match="field shape"):
        roofline.integrate_bytes((1, 2, 4, 4, 4), "float32", 7)
    with pytest.raises(ValueError, match="steps"):
        roofline.integrate_bytes((1, 2, 4, 4), "float32", -1)
    with pytest.raises(ValueError, match="at least one level"):
        roofline.cosine_bytes([], "float32")


# ----------------------------------------------------------------------------------------------------------------
# Feature pyramids used by the DeepSim benchmarks (paper extractor: stage l = enc[l] channels at 1/2**(l+1))
# ----------------------------------------------------------------------------------------------------------------
def test_feature_levels_of_the_benchmark_sizes():
    assert _size("cuda", "3d").levels == ((1, 32, 80, 96, 112), (1, 64, 40, 48, 56), (1, 128, 20, 24, 28))
    assert _size("cuda", "2d").levels == ((4, 64, 512, 512), (4, 128, 256, 256), (4, 256, 128, 128))
    assert _size("cpu", "3d").levels == ((1, 32, 24, 28, 32), (1, 64, 12, 14, 16), (1, 128, 6, 7, 8))
    assert _size("cpu", "2d").levels == ((2, 64, 128, 128), (2, 128, 64, 64), (2, 256, 32, 32))


def test_cosine_bytes_gpu_brain():
    levels = _size("cuda", "3d").levels
    # elements per side: 32*80*96*112 = 27_525_120, 64*40*48*56 = 6_881_280, 128*20*24*28 = 1_720_320
    #                    total 36_126_720 -> fp32 144_506_880 bytes, bf16 72_253_440 bytes
    # fwd: read a and b, write one fp32 scalar (4 bytes)
    assert roofline.cosine_bytes(levels, "float32", "fwd") == 2 * 144_506_880 + 4 == 289_013_764
    assert roofline.cosine_bytes(levels, "bfloat16", "fwd") == 2 * 72_253_440 + 4 == 144_506_884
    # bwd (grad for a only): read grad (4) + a + b, write grad_a
    assert roofline.cosine_bytes(levels, "float32", "bwd") == 4 + 3 * 144_506_880 == 433_520_644
    assert roofline.cosine_bytes(levels, "float32", "bwd", grad_b=True) == 4 + 4 * 144_506_880
    assert roofline.cosine_bytes(levels, "float32", "fwd+bwd") == 289_013_764 + 433_520_644 == 722_534_408
    # reduction "none": one fp32 map (B, *S_l) per level: 860_160 + 107_520 + 13_440 = 981_120 pixels
    assert roofline.cosine_bytes(levels, "bfloat16", "fwd", reduction="none") == 2 * 72_253_440 + 4 * 981_120


def test_cosine_bytes_gpu_2d_and_cpu_sizes():
    # GPU 2D: 4*64*512*512 = 67_108_864, 4*128*256*256 = 33_554_432, 4*256*128*128 = 16_777_216 -> 117_440_512
    assert roofline.cosine_bytes(_size("cuda", "2d").levels, "float32", "fwd") == 2 * 4 * 117_440_512 + 4
    # CPU 2D: 2*64*128*128 = 2_097_152, 2*128*64*64 = 1_048_576, 2*256*32*32 = 524_288 -> 3_670_016 elements
    assert roofline.cosine_bytes(_size("cpu", "2d").levels, "float32", "fwd") == 29_360_132
    assert roofline.cosine_bytes(_size("cpu", "2d").levels, "float32", "fwd+bwd") == 29_360_132 + 44_040_196
    # CPU 3D: 32*24*28*32 = 688_128, 64*12*14*16 = 172_032, 128*6*7*8 = 43_008 -> 903_168 elements = 3_612_672 B
    assert roofline.cosine_bytes(_size("cpu", "3d").levels, "float32", "fwd") == 7_225_348


def test_cosine_flops():
    # one level of 10 channel elements: fwd 3 FMAs each = 60; bwd 60 (norms recomputed) + 40 (grad_a)
    assert roofline.cosine_flops([(1, 2, 5)], "fwd") == 60
    assert roofline.cosine_flops([(1, 2, 5)], "bwd") == 100
    assert roofline.cosine_flops([(1, 2, 5)], "fwd+bwd") == 160
    assert roofline.cosine_flops([(1, 2, 5)], "bwd", grad_b=True) == 140


# ----------------------------------------------------------------------------------------------------------------
# Warp
# ----------------------------------------------------------------------------------------------------------------
def test_warp_bytes_gpu_brain():
    image = _size("cuda", "3d").image
    assert image == (1, 1, 160, 192, 224)
    # N = 160*192*224 = 6_881_280 voxels; image fp32 27_525_120 B; flow (1, 3, ...) fp32 82_575_360 B
    assert roofline.warp_bytes(image, "float32", "fwd") == 27_525_120 * 2 + 82_575_360 == 137_625_600
    # bwd_flow: grad_out + image + flow in, grad_flow out
    assert roofline.warp_bytes(image, "float32", "bwd_flow") == 2 * 27_525_120 + 2 * 82_575_360 == 220_200_960
    # bwd_both: + grad_image out
    assert roofline.warp_bytes(image, "float32", "bwd_both") == 220_200_960 + 27_525_120 == 247_726_080
    assert roofline.warp_bytes(image, "float32", "fwd+bwd_flow") == 137_625_600 + 220_200_960
    # bf16 image and flow: everything halves
    assert roofline.warp_bytes(image, "bfloat16", "fwd") == 68_812_800
    # bf16 image with an fp32 flow: 13_762_560 * 2 + 82_575_360
    assert roofline.warp_bytes(image, "bfloat16", "fwd", flow_dtype="float32") == 110_100_480


def test_warp_bytes_2d_and_cpu_sizes():
    # GPU 2D (4, 1, 1024, 1024): image 4 Mi elements = 16_777_216 B, flow 2x = 33_554_432 B
    assert roofline.warp_bytes(_size("cuda", "2d").image, "float32", "fwd") == 67_108_864
    # CPU 2D (2, 1, 256, 256): image 131_072 elements = 524_288 B, flow 1_048_576 B
    img = _size("cpu", "2d").image
    assert roofline.warp_bytes(img, "float32", "fwd") == 2_097_152
    assert roofline.warp_bytes(img, "float32", "bwd_flow") == 3_145_728
    assert roofline.warp_bytes(img, "float32", "bwd_both") == 3_670_016
    # CPU 3D (1, 1, 48, 56, 64): 172_032 voxels: image 688_128 B, flow 2_064_384 B
    assert roofline.warp_bytes(_size("cpu", "3d").image, "float32", "fwd") == 3_440_640


# ----------------------------------------------------------------------------------------------------------------
# Scaling and squaring (7 steps)
# ----------------------------------------------------------------------------------------------------------------
def test_integrate_bytes():
    assert shapes.STEPS == 7
    flow = _size("cuda", "3d").flow
    assert flow == (1, 3, 160, 192, 224)
    # field 82_575_360 B; fwd 7 steps x (read + write); bwd 7 x (grad in, u_k in, grad out)
    assert roofline.integrate_bytes(flow, "float32", 7, "fwd") == 14 * 82_575_360 == 1_156_055_040
    assert roofline.integrate_bytes(flow, "float32", 7, "bwd") == 21 * 82_575_360
    assert roofline.integrate_bytes(flow, "float32", 7, "fwd+bwd") == 35 * 82_575_360 == 2_890_137_600
    # CPU 3D field (1, 3, 48, 56, 64) = 2_064_384 B; CPU 2D field (2, 2, 256, 256) = 1_048_576 B
    assert roofline.integrate_bytes(_size("cpu", "3d").flow, "float32", 7, "fwd") == 28_901_376
    assert roofline.integrate_bytes(_size("cpu", "2d").flow, "float32", 7, "fwd+bwd") == 36_700_160
    assert roofline.integrate_bytes(_size("cpu", "2d").flow, "float32", 0, "fwd") == 0
