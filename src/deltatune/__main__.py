"""``python -m deltatune``: the same as the `deltatune` command."""

import sys

from deltatune.cli import main

sys.exit(main())
