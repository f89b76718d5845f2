"""``python -m paper_figures``: see `paper_figures` and `paper_figures.build`."""

from __future__ import annotations

import sys

from paper_figures.build import main

sys.exit(main())
