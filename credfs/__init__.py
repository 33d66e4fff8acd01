"""credfs: a credential-aware FUSE passthrough filesystem."""

__version__ = "0.1.0"
