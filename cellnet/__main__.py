"""``python -m cellnet ...``: the same command line as the ``cellnet`` console script."""
import sys

from cellnet.cli import main

sys.exit(main())
