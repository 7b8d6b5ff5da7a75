"""`python -m quantlrm.cli` runs the command line."""

import sys

from quantlrm.cli import main

sys.exit(main())
