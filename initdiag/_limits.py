"""Size limits checked before anything large is built.

A network description, a Monte Carlo run and a phase diagram each have a size that
grows without bound with the user's numbers (``depth``, ``width``, ``seeds``, the
grid).  Python builds one object per layer and NumPy one array per request, so an
absurd request (``depth = 10**9``) would otherwise run for minutes and take tens of
gigabytes before anything complains.  These checks cost O(1) (or one pass over
the layers already built) and refuse with a message in the style of the memory
check of :func:`initdiag.simulate`: what the request would need, the limit, and
what would work.

The limits are far above any study this package is meant for (the deepest networks
of the signal-propagation literature have ~10^4 layers: Xiao et al. 2018 trained
10,000-layer CNNs), and far below what would exhaust a workstation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LimitError",
    "MAX_LAYERS",
    "MAX_WIDTH",
    "MAX_PARAMETERS",
    "MAX_SEEDS",
    "MAX_STATS_BYTES",
    "MAX_FLOPS",
    "MAX_PHASE_WORK",
    "check_mlp",
    "check_layers",
    "check_simulate",
    "check_phase",
]

#: layers of one network (each is a Python object and a Profile row)
MAX_LAYERS = 100_000
#: units of one layer (the C kernels index rows and columns with 32-bit ints)
MAX_WIDTH = 2**31 - 1
#: weights of one network description (10^15 float32 are 4 PB: no simulation could
#: hold them, and the count stays exact in a float64 estimate)
MAX_PARAMETERS = 10**15
#: independent random networks of one Monte Carlo run
MAX_SEEDS = 1_000_000
#: the per-seed statistics table of one run (seeds x layers x columns, float64)
MAX_STATS_BYTES = 1 << 30
#: floating-point operations of one Monte Carlo run (~6 per weight per example per
#: seed: forward, input gradient and weight gradient); 10^15 is days of a
#: workstation's BLAS
MAX_FLOPS = 10**15
#: grid points x layers of one phase diagram (the correlation map is iterated
#: ``depth`` times on every grid point; ~1 s per 10^7 point-layers)
MAX_PHASE_WORK = 10**9


class LimitError(ValueError):
    """A size beyond a limit; ``key`` names the setting at fault (``"depth"``,
    ``"width"``, ``"seeds"``, ``"batch_size"``, ``"layers"``, ...), so that the
    command line can blame the option or the file key that gave it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _n(x: float) -> str:
    # an int beyond float range (depth = 10**300 in a TOML file) has no float
    # format: state its order of magnitude
    if isinstance(x, int) and x >= 10**15:
        return f"~1e{len(str(x)) - 1}"
    return f"{x:,.0f}" if x < 1e15 else f"{x:.2g}"


def check_mlp(
    depth: int,
    width: int,
    input_dim: int | None,
    per_block: int,
    readout: int | None,
) -> None:
    """Refuse an :func:`~initdiag.network.mlp` too large to build (before building).

    Parameters
    ----------
    depth, width : int
        Hidden blocks and units per block (already checked to be positive).
    input_dim : int or None
        Input features (``None``: the width).
    per_block : int
        Layers per block (2 without BatchNorm, 3 with).
    readout : int or None
        Width of the readout Dense layer, if any.

    Raises
    ------
    ValueError
        Naming ``depth`` or ``width``, the size it would give and the limit.
    """
    layers = depth * per_block + (readout is not None)
    if layers > MAX_LAYERS:
        raise LimitError(
            f"depth {_n(depth)} would give {_n(layers)} layers but the limit is "
            f"{_n(MAX_LAYERS)}; use depth <= {_n(MAX_LAYERS // per_block)}",
            "depth",
        )
    dims = (("width", width), ("input_dim", input_dim), ("output_dim", readout))
    for what, w in dims:
        if isinstance(w, int) and w > MAX_WIDTH:
            raise LimitError(
                f"{what} {_n(w)} is above the limit of {_n(MAX_WIDTH)} units per "
                f"layer; use a smaller {what}",
                what,
            )
    fan0 = input_dim if isinstance(input_dim, int) else width
    out = readout if isinstance(readout, int) else 0
    params = fan0 * width + (depth - 1) * width * width + out * width
    if params > MAX_PARAMETERS:
        raise LimitError(
            f"depth {_n(depth)} x width {_n(width)} would have about {_n(params)} "
            f"weights but the limit is {_n(MAX_PARAMETERS)}; use a narrower or "
            f"shallower network",
            "width",
        )


def _flatten(layers: Sequence[Any], fan: int, depth: int = 0):
    """(layer, fan_in, width) of every layer, composites' children included, in
    execution order; refuses nesting deeper than any real network's."""
    if depth > 64:
        raise LimitError("residual blocks nested more than 64 deep", "layers")
    for layer in layers:
        for seq in layer.children():
            yield from _flatten(seq, fan, depth + 1)
        w = layer.output_width(fan)
        yield layer, fan, w
        fan = w


def check_layers(input_dim: int, layers: Sequence[Any]) -> None:
    """Refuse a layer list too long, too wide or with too many weights.

    Called by :class:`~initdiag.network.Network` before it builds its per-layer
    records; ``layers`` is the tuple of layer specs already validated.

    Raises
    ------
    ValueError
        Naming the count, the limit and what would work.
    """
    flat = list(_flatten(layers, input_dim))
    if len(flat) > MAX_LAYERS:
        raise LimitError(
            f"a network of {_n(len(flat))} layers is above the limit of "
            f"{_n(MAX_LAYERS)} layers; use fewer layers",
            "layers",
        )
    if input_dim > MAX_WIDTH:
        raise LimitError(
            f"input_dim {_n(input_dim)} is above the limit of {_n(MAX_WIDTH)}; use "
            f"a smaller input_dim",
            "input_dim",
        )
    params = 0
    for i, (layer, fan, w) in enumerate(flat):
        if w > MAX_WIDTH:
            raise LimitError(
                f"layers[{i}] width {_n(w)} is above the limit of {_n(MAX_WIDTH)} "
                f"units per layer; use a smaller width",
                "layers",
            )
        params += sum(math.prod(layer.param_shape(t, fan, w)) for t in layer.slots())
    if params > MAX_PARAMETERS:
        raise LimitError(
            f"the network would have about {_n(params)} weights but the limit is "
            f"{_n(MAX_PARAMETERS)}; use a narrower or shallower network",
            "layers",
        )


def check_simulate(
    network: Any, batch_size: int, seeds: int, n_columns: int = 12
) -> None:
    """Refuse a Monte Carlo run whose seed count or work is beyond reach.

    The memory of one seed is checked separately (:func:`initdiag.simulate` against
    the available memory); this check covers what grows with ``seeds``: the
    per-seed statistics (``seeds x layers x n_columns`` float64) and the total work
    ``~ 6 * seeds * batch_size * weights`` floating-point operations.

    Raises
    ------
    ValueError
        Naming ``seeds`` (or ``batch_size`` and the network when one seed alone is
        beyond the limit), the estimate and the limit.
    """
    if seeds > MAX_SEEDS:
        raise LimitError(
            f"seeds {_n(seeds)} is above the limit of {_n(MAX_SEEDS)}; the standard "
            f"error falls as 1/sqrt(seeds), so a few dozen seeds are usually enough",
            "seeds",
        )
    table = seeds * len(network.infos) * n_columns * 8
    if table > MAX_STATS_BYTES:
        raise LimitError(
            f"seeds {_n(seeds)} x {_n(len(network.infos))} layers would need "
            f"{table / 2**30:.1f} GiB of per-seed statistics but the limit is "
            f"{MAX_STATS_BYTES / 2**30:.0f} GiB; use seeds <= "
            f"{_n(MAX_STATS_BYTES // (len(network.infos) * n_columns * 8))}",
            "seeds",
        )
    weights = sum(
        math.prod(info.layer.param_shape(t, info.fan_in, info.width))
        for info in network.infos
        for t in info.layer.slots()
        if t.matrix
    )
    per_seed = 6 * batch_size * max(weights, 1)
    flops = seeds * per_seed
    if flops > MAX_FLOPS:
        if per_seed * 2 > MAX_FLOPS:
            fix = "use a smaller batch_size or a narrower or shallower network"
            key = "batch_size"
        else:
            fix = f"use seeds <= {_n(MAX_FLOPS // per_seed)}"
            key = "seeds"
        raise LimitError(
            f"simulate() would need about {flops:.2g} floating-point operations "
            f"(seeds {_n(seeds)} x batch_size {_n(batch_size)} x {_n(weights)} "
            f"weights x 6) but the limit is {MAX_FLOPS:.0e}; {fix}",
            key,
        )


def check_phase(n_w: int, n_b: int, depth: int) -> None:
    """Refuse a phase diagram whose grid times depth is beyond reach.

    Raises
    ------
    ValueError
        Naming ``depth`` and the grid, the work and the limit.
    """
    if depth > MAX_LAYERS:
        raise LimitError(
            f"depth {_n(depth)} is above the limit of {_n(MAX_LAYERS)} layers; use a "
            f"smaller depth",
            "depth",
        )
    work = n_w * n_b * max(depth, 1)
    if work > MAX_PHASE_WORK:
        raise LimitError(
            f"a {n_w} x {n_b} grid iterated over {_n(depth)} layers is about "
            f"{_n(work)} point-layers but the limit is {_n(MAX_PHASE_WORK)}; use "
            f"depth <= {_n(MAX_PHASE_WORK // (n_w * n_b))} or a coarser grid",
            "depth",
        )
