"""``python -m varjax [compare] [options]``: compare optimizers by training a small model.

See ``python -m varjax --help`` and ``varjax.compare``.
"""

from __future__ import annotations

import sys

from varjax.compare import main

if __name__ == "__main__":
    sys.exit(main())
