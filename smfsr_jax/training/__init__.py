"""Training state, jitted steps, sharding and checkpoints."""
