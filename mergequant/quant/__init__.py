"""Quantization: calibration data, layer-by-layer solvers (GPTQ, AWQ, int8) and on-disk formats."""
