"""lmforge: the whole life of a language model, in code you can read in an afternoon."""

__version__ = "0.1.0"
__all__ = ["LM", "load", "__version__"]


def __getattr__(name: str):
    # `lmforge.load` and `lmforge.LM` import torch; resolving them lazily keeps `lmforge --help` instant.
    if name in ("LM", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
