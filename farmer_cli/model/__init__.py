"""The FARMER model as a library: ``from farmer_cli.model import Farmer``."""

from farmer_cli.model.attention import KVCache, TransformerStack
from farmer_cli.model.farmer import Farmer, NonFiniteError, check_finite, dequantize, quantize
from farmer_cli.model.flow import AFBlock, AutoregressiveFlow
from farmer_cli.model.gmm import GMM, GMMHead
from farmer_cli.model.prior import ARPrior

__all__ = ["AFBlock", "ARPrior", "AutoregressiveFlow", "Farmer", "GMM", "GMMHead", "KVCache", "NonFiniteError",
           "TransformerStack", "check_finite", "dequantize", "quantize"]
