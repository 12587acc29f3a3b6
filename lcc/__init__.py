"""Latent Cluster Correction (LCC) for PyTorch classifiers."""

from lcc.errors import LCCInputError

__version__ = "0.1.0"
__all__ = ["LCCInputError", "__version__"]
