"""``python -m geomfit ...``: the same as the ``geomfit`` command."""
import sys

from .cli import main

sys.exit(main())
