"""``python -m mimkit`` (and ``torchrun -m mimkit``) runs the command line."""

from mimkit.cli import main

raise SystemExit(main())
