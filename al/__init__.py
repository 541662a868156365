"""Associated Learning (Kao & Chen, Neural Computation 2021) in plain PyTorch."""

__version__ = "0.1.0"
