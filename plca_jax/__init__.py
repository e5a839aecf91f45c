"""plca_jax: Pixel-Level Cycle Association (NeurIPS 2020) in JAX/Flax."""

__version__ = "0.1.0"
