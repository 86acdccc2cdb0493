"""One module per architecture family. Detection tries them in this order (a family's recognition must not
claim another's state dicts; the order only decides which of two claims is checked first)."""
from . import flux, sd

FAMILIES = (sd.FAMILY, flux.FAMILY)

__all__ = ["FAMILIES", "flux", "sd"]
