"""`python -m flows.cli ...`: the same as `q3e ...`."""

import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
