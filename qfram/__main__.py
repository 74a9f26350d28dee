"""``python -m qfram``: the qfram command (qfram.cli)."""
import sys

from qfram.cli import main

sys.exit(main())
