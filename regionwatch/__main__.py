"""`python -m regionwatch`: the same as the `regionwatch` console script."""

import sys

from regionwatch.cli import main

sys.exit(main())
