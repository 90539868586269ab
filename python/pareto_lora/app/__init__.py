"""The applications built on the library: the ``pareto-lora`` command (:mod:`.cli`), the demo
experiment (:mod:`.demo`), microbenchmarks (:mod:`.benchmarking`) and install facts (:mod:`.env`).

The top layer: may import anything in the package; nothing in the package imports it.
"""
