# ruff: noqa: E501  (the TOML text below is kept byte-identical to examples/)
"""The default study of ``initdiag report``: ``examples/bias_question.toml``.

The installed package cannot read ``examples/``, so the study ships here as a string;
``tests/test_report.py`` checks that both stay identical.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_STUDY_TOML", "default_study_dict"]

DEFAULT_STUDY_TOML = """\
# The question initdiag was born from: why are biases initialised to zero, and not with
# Kaiming like the weights?  Why is BatchNorm's gamma initialised to ones and beta to zeros?
#
# A 30-block, width-512 ReLU MLP with Kaiming-normal weights (the ReLU edge of chaos), and
# eight ways of initialising the biases or the BatchNorm parameters; then the residual half:
# 10-block ResNets (x + BN(W2 relu(BN(W1 x)))) with gamma = 1 or 0 on the last BatchNorm of
# each block (Goyal et al. 2017), SkipInit (alpha = 0) and Fixup, without normalisation.
#   initdiag report examples/bias_question.toml

[study]
name = "bias_question"
description = "Zero bias vs Kaiming-style, torch-default, N(0, 0.1^2) and constant biases; BatchNorm gamma/beta variants; residual networks: last-BN gamma = 1 vs 0, SkipInit, Fixup."

[network]
depth = 30
width = 512
activation = "relu"

[init]
weight = "kaiming_normal(nonlinearity='relu')"
bias = "zeros"
bn_weight = "ones"
bn_bias = "zeros"

[simulate]
batch_size = 256
seeds = 4

# initdiag report --train STEPS: every variant rebuilt at width 96 (same depth, same
# initialisation laws: the mean-field statistics above do not depend on the width;
# the narrower copies keep the run short) and trained from 3 fresh initialisations
# on the synthetic task, batches of 64
[train]
width = 96
seeds = 3
batch_size = 64

[[variants]]
name = "bias = 0"

[[variants]]
name = "bias ~ Kaiming"
init = { bias = "kaiming_normal(nonlinearity='relu')" }

[[variants]]
name = "bias ~ torch default"
init = { bias = "torch_default" }

[[variants]]
name = "bias ~ N(0, 0.1^2)"
init = { bias = { name = "normal", std = 0.1 } }

[[variants]]
name = "bias = 0.1"
init = { bias = "constant(0.1)" }

[[variants]]
name = "BN gamma=1, beta=0"
network = { batchnorm = true }

[[variants]]
name = "BN gamma ~ U(0,1)"
network = { batchnorm = true }
init = { bn_weight = "uniform(0, 1)" }

[[variants]]
name = "BN beta ~ N(0, 0.1^2)"
network = { batchnorm = true }
init = { bn_bias = "normal(0, 0.1)" }

[[variants]]
name = "ResNet BN, last gamma = 1"
network = { blocks = 10, norm = "batchnorm", norm_position = "post" }

[[variants]]
name = "ResNet BN, last gamma = 0"
network = { blocks = 10, norm = "batchnorm", norm_position = "post", zero_init_residual = true }

[[variants]]
name = "ResNet SkipInit (alpha = 0)"
network = { blocks = 10, norm = "none", skipinit = true }

[[variants]]
name = "ResNet Fixup"
network = { blocks = 10, norm = "none", fixup = true }
"""


def default_study_dict() -> dict[str, Any]:
    """The default study as a dict for :func:`initdiag.configfile.load_study`."""
    import tomllib

    return tomllib.loads(DEFAULT_STUDY_TOML)
