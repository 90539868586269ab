"""The digits world (issue 25): the study on real 8x8 handwritten digits (scikit-learn's load_digits).

tokens.py (split, VQ codebook), data.py (generation / understanding sequences), metrics.py
(held-out losses, understanding and generation accuracy), experiment.py (base, LoRA runs),
report.py (intervals, distances to the reweighting curve, verdict), study.py (the protocol and the
presets), output.py (processes, files, printout), plots.py. docs/study_digits.md has the protocol.
three.py and three_study.py: the same world with three objectives (text, understanding,
generation), the K = 3 rules against a grid of fixed loss weights (docs/study_three.md).
"""

from .experiment import DigitsConfig
from .output import run_digits_demo
from .study import DEFAULT, FULL, QUICK, STRONG

__all__ = ["DigitsConfig", "run_digits_demo", "QUICK", "DEFAULT", "FULL", "STRONG"]
