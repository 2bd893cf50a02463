from comptrust.nn.act_order_linear import ActOrderQuantLinear
from comptrust.nn.bitmap_sparse_linear import BitmapSparseLinear
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.sparse24_linear import Sparse24Int4Linear, Sparse24Linear
from comptrust.nn.swap import replace_linears
from comptrust.nn.tiled_linear import TiledLinear

__all__ = ["ActOrderQuantLinear", "BitmapSparseLinear", "QuantLinear", "Sparse24Int4Linear", "Sparse24Linear", "TiledLinear",
           "replace_linears"]
