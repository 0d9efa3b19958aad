"""``python -m medsynth`` is the same as the ``medsynth`` console script."""

import sys

from medsynth.cli import main

if __name__ == "__main__":
    sys.exit(main())
