"""The trained examples that the command line's demos and the notebooks share.

* `xentjax.demos.contrastive`: CLIP-style training on the bundled digits
  (`xentjax demo --contrastive`, notebook 11);
* `xentjax.demos.distill`: knowledge distillation at several temperatures
  (`xentjax demo --distill`, notebook 09).

They import JAX on use; the data they train on ships inside the package
(`xentjax/data/`).
"""

from xentjax.demos import contrastive as contrastive
from xentjax.demos import distill as distill

__all__ = ["contrastive", "distill"]
