"""One module per architecture family. Detection tries them in this order (a family's recognition must not
claim another's state dicts; the order only decides which of two claims is checked first).
Adding a family: one import line and one `FAMILIES +=` line."""
from . import flux, qwen_image, sd, sd3

FAMILIES = (sd.FAMILY, flux.FAMILY, qwen_image.FAMILY, sd3.FAMILY)
__all__ = ["FAMILIES", "flux", "qwen_image", "sd", "sd3"]

from . import hunyuan_video  # noqa: E402
FAMILIES += (hunyuan_video.FAMILY,)
__all__ += ["hunyuan_video"]

from . import lumina  # noqa: E402
FAMILIES += (lumina.FAMILY,)
__all__ += ["lumina"]

from . import wan  # noqa: E402
FAMILIES += (wan.FAMILY,)
__all__ += ["wan"]

from . import flux2  # noqa: E402
FAMILIES += (flux2.FAMILY,)
__all__ += ["flux2"]

from . import hidream  # noqa: E402
FAMILIES += (hidream.FAMILY,)
__all__ += ["hidream"]
