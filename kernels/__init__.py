"""Triton kernels and their launchers, installed as `fastrl.kernels`."""
