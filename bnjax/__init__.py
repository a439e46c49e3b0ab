"""bnjax: batch normalization for JAX."""

__version__ = "0.1.0"
