"""``python -m kdfast.demo``."""

import sys

from kdfast.demo import main

sys.exit(main())
