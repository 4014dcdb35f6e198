"""lmforge: the whole life of a language model, in code you can read in an afternoon."""

from .api import LM, load

__version__ = "0.1.0"
__all__ = ["LM", "load", "__version__"]
