"""QuantLRM: weight quantization of large reasoning models via fine-tuning signals."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `quantlrm.load_quantized` and `quantlrm.generate` without importing torch/triton at package import.
    if name == "load_quantized":
        from quantlrm.nn import load_quantized

        return load_quantized
    if name == "generate":
        from quantlrm.decoding import generate

        return generate
    raise AttributeError(f"module 'quantlrm' has no attribute {name!r}")
