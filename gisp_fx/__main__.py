"""`python -m gisp_fx ...` (and `torchrun -m gisp_fx compile ...`): the gisp-fx command line."""

import sys

from gisp_fx.cli import main

sys.exit(main())
