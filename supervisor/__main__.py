"""``python -m supervisor`` is ``capvisor``."""

import sys

from .cli import main

sys.exit(main())
