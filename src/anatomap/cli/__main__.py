"""``python -m anatomap.cli``."""

import sys

from anatomap.cli import main

sys.exit(main())
