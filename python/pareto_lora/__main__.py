"""``python -m pareto_lora``: the same command line as the ``pareto-lora`` script.
"""

import sys

from .app.cli import main

sys.exit(main())
