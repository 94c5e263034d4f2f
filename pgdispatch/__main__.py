"""`python -m pgdispatch ...`: the same as the `pgdispatch` command."""

import sys

from pgdispatch.console.main import main

sys.exit(main())
