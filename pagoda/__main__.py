"""`python -m pagoda ...` (and `torchrun ... -m pagoda serve ...`): the `pagoda` command."""

import sys

from pagoda.cli import main

sys.exit(main())
