"""Quantization: NF4 with double quantization, 8-bit blockwise (dynamic codebook), a 4-bit linear layer."""
from .blockwise import BlockState, dequantize_blockwise, dynamic_map, quantize_blockwise
from .linear4bit import Linear4bit
from .nf4 import NF4_CODE, NF4State, dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from .model import prepare_for_training, quantize, quantized_layers, requantize, weight_bytes

__all__ = ["BlockState", "Linear4bit", "NF4State", "NF4_CODE", "dequantize_blockwise", "dequantize_nf4",
           "dequantize_nf4_reference", "dynamic_map", "prepare_for_training", "quantize",
           "quantize_blockwise", "quantize_nf4", "quantized_layers", "requantize", "weight_bytes"]
