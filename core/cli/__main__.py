"""``python -m core.cli ...`` (what torchrun and the deepspeed launcher run)."""

import sys

from core.cli import main

sys.exit(main())
