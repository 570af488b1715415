"""``python3 -m edgetl_runtime …`` on the device (``python -m edgetl.runtime`` on a host)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
