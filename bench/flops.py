"""The FLOP formula and peak table, kept importable from bench/ (they live in train/flops.py, which the trainer's
TFLOP/s and MFU use)."""

from train.flops import BF16_PEAK_TFLOPS, FlopBreakdown, flops_per_token, peak_tflops

__all__ = ["BF16_PEAK_TFLOPS", "FlopBreakdown", "flops_per_token", "peak_tflops"]
