"""``python -m aioasync_tasks``: the command line (see ``_cli``)."""

import sys

from ._cli.app import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
