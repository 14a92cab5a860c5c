"""Wan 2.1 / 2.2 video diffusion models and their trainer, as pure JAX functions."""
