"""``python -m pipeline.cli``: the ``dgiqa`` command from a source tree, without installing the package."""

import sys

from pipeline.cli import main

sys.exit(main())
