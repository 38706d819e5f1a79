"""Device dispatch for the public ops (placeholder routing to the reference until the Triton ops land)."""

from deepsim_rt.kernels.reference import integrate, multilayer_cosine, warp

__all__ = ["multilayer_cosine", "warp", "integrate"]
