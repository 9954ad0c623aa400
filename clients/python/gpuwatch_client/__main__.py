"""``python -m gpuwatch_client``: the same command line as ``gpuwatch-py``."""

import sys

from .cli import main

sys.exit(main())
