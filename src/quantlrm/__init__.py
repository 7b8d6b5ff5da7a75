"""QuantLRM: weight quantization of large reasoning models via fine-tuning signals."""

__version__ = "0.1.0"
