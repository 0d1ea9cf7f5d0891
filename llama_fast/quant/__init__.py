"""Quantized formats (qlinear.py: int8, int4, as module swaps) and GPTQ into int4 (gptq.py)."""
