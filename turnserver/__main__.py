"""`python -m turnserver` runs the command line."""

import sys

from turnserver.cli import main

sys.exit(main())
