"""Feature extraction: image decoding, backbones and the chunk store (checkpoints)."""
