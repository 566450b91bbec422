"""``python -m kdfast.benchmarks.offline``."""

import sys

from kdfast.benchmarks.offline import main

sys.exit(main())
