"""`python -m ruyiflow`."""

import sys

from ruyiflow.cli import main

sys.exit(main())
