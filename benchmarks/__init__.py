"""deepsim_rt benchmarks (pytest-benchmark): `make bench` (CPU) and `make gpu-check` (GPU). Not part of `make test`."""
