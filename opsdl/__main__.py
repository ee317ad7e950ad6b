"""``python -m opsdl`` and ``torchrun -m opsdl``: the command line."""
from .cli import main

raise SystemExit(main())
