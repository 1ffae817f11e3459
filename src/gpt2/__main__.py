"""``python -m gpt2`` is the ``gpt2`` command (and what ``torchrun -m gpt2`` runs)."""

import sys

from gpt2.cli import main

sys.exit(main())
