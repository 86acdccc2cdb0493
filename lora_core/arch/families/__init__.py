"""One module per architecture family. Detection tries them in this order (a family's recognition must not
claim another's state dicts; the order only decides which of two claims is checked first)."""
from . import flux, qwen_image, sd, sd3
from . import flux2
from . import hidream

FAMILIES = (sd.FAMILY, flux.FAMILY, qwen_image.FAMILY, sd3.FAMILY)
FAMILIES += (flux2.FAMILY,)
FAMILIES += (hidream.FAMILY,)

__all__ = ["FAMILIES", "flux", "qwen_image", "sd", "sd3"]
__all__ += ["flux2"]
__all__ += ["hidream"]
