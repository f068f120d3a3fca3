"""`python -m cellssl …`: the command line, for environments whose scripts folder is not on PATH."""
import sys

from cellssl.engine.cli import main

sys.exit(main())
