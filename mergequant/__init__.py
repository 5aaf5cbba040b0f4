"""mergequant: merge, quantize and publish open LLM checkpoints."""

__version__ = "0.1.0"
