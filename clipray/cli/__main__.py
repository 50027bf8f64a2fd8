"""``python -m clipray.cli``: the same as the ``clipray`` command."""

import sys

from clipray.cli.main import main

sys.exit(main())
