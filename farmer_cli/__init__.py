"""farmer: command-line toolkit for FARMER (Flow AutoRegressive Transformer over Pixels)."""

__version__ = "0.1.0"
