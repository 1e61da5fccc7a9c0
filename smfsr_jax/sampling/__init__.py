"""One-step and multi-step sampling, latent tiling and colour correction."""
