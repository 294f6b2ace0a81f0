"""int8 quantization of exported graphs and of the PKM value table."""

from .int8 import QuantizationReport, quantize_graph, quantize_rows

__all__ = ["QuantizationReport", "quantize_graph", "quantize_rows"]
