"""`python -m bitnet_training` is the `bitnet-train` CLI."""

import sys

from .cli import main

sys.exit(main())
