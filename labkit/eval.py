"""Old name of :mod:`labkit.quality` (``eval`` shadowed a Python builtin). Kept for one release:
``from labkit import eval`` gives the same module object as ``from labkit import quality``."""
import sys

from . import quality

sys.modules[__name__] = quality
