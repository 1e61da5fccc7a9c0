"""Networks (flax.linen): MM-DiT, SD3 VAE, text encoders, discriminator and metric networks."""
