"""``python -m ltd.serve``: run the server without the ``ltd`` front end."""

import sys

from ltd.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
