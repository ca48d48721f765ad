"""mimkit: self-supervised visual pre-training by masked image modeling."""

__version__ = "0.1.0"
