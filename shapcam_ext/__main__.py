"""``python -m shapcam_ext``: the same as the ``shapcam`` command."""
import sys

from shapcam_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
