"""The FARMER model as a library: ``from farmer_cli.model import Farmer``."""

from .attention import KVCache, TransformerStack
from .farmer import Farmer, dequantize, quantize
from .flow import AFBlock, AutoregressiveFlow
from .gmm import GMM, GMMHead
from .prior import ARPrior

__all__ = ["AFBlock", "ARPrior", "AutoregressiveFlow", "Farmer", "GMM", "GMMHead", "KVCache", "TransformerStack",
           "dequantize", "quantize"]
