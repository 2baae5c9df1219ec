"""Triton kernels, installed as ``fastcd.kernels``. Nothing is imported eagerly: Triton stays optional."""
