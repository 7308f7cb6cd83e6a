"""`python -m fedge.cli ...` is the `fedge` command."""

import sys

from fedge.cli import main

sys.exit(main())
