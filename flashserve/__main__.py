"""``python -m flashserve``: the same as the ``flashserve`` command."""
import sys

from flashserve.cli import main

sys.exit(main())
