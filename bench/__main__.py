"""`python -m bench`: the spawn-mode activation benchmark (bench/spawn.py)."""

import sys

from bench.spawn import main

if __name__ == "__main__":
    sys.exit(main())
