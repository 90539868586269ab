"""K objectives: the per-group Gram of K gradients, K-objective weightings, their float64 reference.

For K gradient buffers g_0 .. g_{K-1} of one layout (2 <= K <= :data:`MAX_OBJECTIVES`), a segment's
statistics are the upper triangle of its K x K Gram matrix, G_ij = g_i . g_j, as one row of
``K (K + 1) / 2`` float64 numbers in the order of :func:`pairs` (row-major upper triangle:
(0,0), (0,1), ..., (0,K-1), (1,1), ...). A weighting maps the batched Gram [G, K, K] (float64)
to weights [G, K]; the combine writes ``out = sum_k w_k g_k`` per segment.

This layer sits below the backends and the public ops: the compiled and Triton backends, the float64
reference backend and the ops all take the layout from here.
"""

from .gram import MAX_OBJECTIVES, gram_matrix, num_pairs, pairs, upper_triangle

__all__ = ["MAX_OBJECTIVES", "gram_matrix", "num_pairs", "pairs", "upper_triangle"]
