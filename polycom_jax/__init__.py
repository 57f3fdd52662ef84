"""polycom-jax: PolyCom activations (PolyNorm, PolyReLU) in JAX/Flax language models."""
