"""`python cli.py ...` in a checkout: the same as the installed `pgdispatch` command
(pgdispatch.console.main), for operators who run the tool from the repository."""

import sys

from pgdispatch.console.main import main

if __name__ == "__main__":
    sys.exit(main())
