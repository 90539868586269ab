"""Does it help on my data? Run the demo's protocol on your own model and data.

    from pareto_lora.study import Study

    def run(method, seed):      # fine-tune with `method` (method.rule, or L_text + method.weight*L_image)
        ...                     # everything random from `seed`; evaluate on held-out data
        return {"text": text_val_loss, "image": image_val_loss}

    result = Study(rules=["pareto_lora", "upgrad"], weights=(1, 2, 4, 8), seeds=range(5),
                   log="study.jsonl").run(run)
    print(result.report())

Each rule is compared, paired by seed, with vanilla LoRA (w = 1) and with the reweighting curve
``L_text + w*L_image`` at equal text (and equal image) metric, with 95% t-intervals and words from
the intervals only; the report opens with a power line (can the study tell w = 2 from w = 1?).
docs/your_data.md describes the protocol. Modules, bottom up: stats (intervals and words), frontier
(the curve), protocol (methods, seeds, metrics), records (one run), compare (the statistics),
report (the words), log (JSON lines), result (:class:`Result`), study (:class:`Study`, the runner).
Everything but study.py is pure Python (an import-linter contract in pyproject.toml keeps torch out).
"""

from .protocol import Method, Protocol
from .result import Result
from .study import Study

__all__ = ["Study", "Result", "Method", "Protocol"]
