"""Optimizers: AdamW with 8-bit blockwise-quantized moments."""
from .adamw8bit import AdamW8bit, state_bytes

__all__ = ["AdamW8bit", "state_bytes"]
