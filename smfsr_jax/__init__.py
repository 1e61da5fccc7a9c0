"""smfsr-jax: one-step real-world x4 super-resolution (SMFSR) in JAX/Flax."""
