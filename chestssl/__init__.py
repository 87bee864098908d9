"""ChestSSL: self-supervised pretraining on chest imaging, as a reproducible DVC pipeline."""

__version__ = "0.1.0"
