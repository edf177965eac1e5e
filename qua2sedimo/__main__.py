"""``python -m qua2sedimo ...`` = the ``qua2sedimo`` command."""
import sys

from .cli import main

sys.exit(main())
