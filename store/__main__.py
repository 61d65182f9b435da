"""`python -m store check PATH [--recompute N]`."""

import sys

from store.check import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        print("usage: python -m store check PATH [--recompute N] [--json]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
