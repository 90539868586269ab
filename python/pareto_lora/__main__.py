"""``python -m pareto_lora``: the same command line as the ``pareto-lora`` script.
May import: :mod:`pareto_lora.app.cli`.
"""

import sys

from .app.cli import main

sys.exit(main())
