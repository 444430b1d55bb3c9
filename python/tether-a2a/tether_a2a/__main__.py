"""``python -m tether_a2a`` is ``python -m tether_a2a.worker``."""

import sys

from .worker import main

sys.exit(main())
