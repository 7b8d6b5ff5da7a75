"""`python -m quantlrm` runs the command line."""

import sys

from quantlrm.cli import main

sys.exit(main())
