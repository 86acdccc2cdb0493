"""One module per architecture family. Detection tries them in this order (a family's recognition must not
claim another's state dicts; the order only decides which of two claims is checked first)."""
from . import flux, qwen_image, sd, sd3
from . import hunyuan_video
from . import lumina
from . import wan

FAMILIES = (sd.FAMILY, flux.FAMILY, qwen_image.FAMILY, sd3.FAMILY,
            hunyuan_video.FAMILY,
            lumina.FAMILY,
            wan.FAMILY)

__all__ = ["FAMILIES", "flux", "qwen_image", "sd", "sd3",
           "hunyuan_video",
           "lumina",
           "wan"]
