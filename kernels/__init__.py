"""Kernels of frdiff_compile, installed as `frdiff_compile.kernels` (never as a top-level `kernels`)."""
