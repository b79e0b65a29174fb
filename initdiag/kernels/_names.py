"""Names and constants shared by the dispatchers and every kernel family.

Importable without Numba (``import initdiag.kernels`` must not import it): the
activation table, its integer codes (what the Numba, C and CUDA kernels switch on),
the constants of the activation formulas and the statistics' field orders.
"""

from __future__ import annotations

import math

ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "silu",
    "selu",
    "erf",
    "identity",
)
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
RELU, LEAKY, TANH, SIGMOID, GELU, SILU, SELU, ERF, IDENTITY = range(9)

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRTPI = 2.0 / math.sqrt(math.pi)

SUMMARY_FIELDS = (
    "mean",
    "second_moment",
    "variance",
    "squared_mean",
    "active_fraction",
    "dead_fraction",
    "zero_fraction",
    "nonfinite_count",
)

# layer_stats (kernels/fused.py): the summary fields, then the mean uncentred cosine
# between rows and whether any entry is nonzero
LAYER_STATS_FIELDS = (*SUMMARY_FIELDS, "correlation", "any_nonzero")
