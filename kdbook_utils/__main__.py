"""``python -m kdbook_utils``: the command line (see :mod:`kdbook_utils.cli`)."""

import sys

from kdbook_utils.cli import main

if __name__ == "__main__":
    sys.exit(main())
