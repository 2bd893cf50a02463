from comptrust.nn.act_order_linear import ActOrderQuantLinear
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.swap import replace_linears

__all__ = ["ActOrderQuantLinear", "QuantLinear", "replace_linears"]
