"""cliptune: contrastive fine-tuning and domain adaptation for CLIP-family models."""

__version__ = "0.1.0"
