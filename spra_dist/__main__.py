"""``python -m spra_dist``: the same command line as ``spra``."""

from spra_dist.cli import main

raise SystemExit(main())
