from __future__ import annotations

import sys

from snapshotter.cli import main

sys.exit(main())
