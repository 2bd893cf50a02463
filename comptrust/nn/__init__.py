from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.swap import replace_linears

__all__ = ["QuantLinear", "replace_linears"]
