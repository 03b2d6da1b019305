"""fastsft: fast single-GPU instruction tuning."""

__version__ = "0.1.0"
