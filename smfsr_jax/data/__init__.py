"""Data: TFDS builders, grain pipelines, Real-ESRGAN degradation, caption embeddings."""
