"""What law a parameter tensor was drawn from (private to
:mod:`initdiag.integrations.torch`): its measured moments, its fans (torch's
``_calculate_fan_in_and_fan_out`` convention) and the torch default it most
probably came from.

A tensor of ``n`` entries with sample variance ``v`` and kurtosis ``k`` is matched
against the laws torch code initialises with (``nn.Linear`` / ``nn.Conv``'s
``kaiming_uniform(a=sqrt(5))`` = ``U(+-1/sqrt(fan_in))`` and its bias, torchvision's
``kaiming_normal_(mode="fan_out")``, He / Glorot / LeCun, timm's
``trunc_normal_(std=0.02)``, ``ones`` / ``zeros``).  A candidate matches when its
shape agrees (kurtosis 9/5 for a uniform law, 3 for a normal one: the closer of
the two, the sample kurtosis having standard error ``sqrt(24/n)`` for a normal
law) and ``|v - v_c| <= 4 se(v)`` with ``se(v) = v_c sqrt((k_c - 1)/n)``, the
standard error of a sample variance (Cramer 1946, 27.7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import initializers as I

__all__ = ["TensorLaw", "tensor_law", "module_fans", "Z_MATCH"]

#: standard errors within which a measured variance matches a candidate law
Z_MATCH = 4.0
#: entries below which the kurtosis (standard error sqrt(24/n) > 0.6) cannot tell
#: a uniform law (9/5) from a normal one (3): both shapes are candidates
SMALL = 64


@dataclass(frozen=True)
class TensorLaw:
    """The measured moments of one parameter tensor and the law read off them.

    ``law`` is an initdiag initializer with absolute parameters (its moments do
    not depend on the fans it is later given); ``source`` names the torch default
    it matches ("" when none does); ``implied_var`` is the variance of ``law``.
    """

    name: str
    shape: tuple[int, ...]
    mean: float
    var: float
    kurtosis: float
    fan_in: int
    fan_out: int
    law: Any
    source: str
    implied_var: float

    @property
    def law_second_moment(self) -> float:
        """``E[x^2]`` under ``law`` (the measured moments when none matched)."""
        return float(self.law.second_moment(self.fan_in, self.fan_out))


def module_fans(m: nn.Module) -> tuple[int, int] | None:
    """The fans of a module's weight (what its bias's default law uses too)."""
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return nn.init._calculate_fan_in_and_fan_out(w)
    return None


def _candidates(kind: str, fi: int, fo: int) -> list[tuple[str, str, float]]:
    """(description, shape, variance) of the laws a tensor of ``kind`` (``weight``,
    ``bias``) with these fans is commonly drawn from."""
    if kind == "bias":
        return [
            (
                "nn.Linear / nn.Conv default bias U(+-1/sqrt(fan_in))",
                "uniform",
                1 / (3 * fi),
            ),
        ]
    return [
        (
            "nn.Linear / nn.Conv default kaiming_uniform(a=sqrt(5)) = "
            "U(+-1/sqrt(fan_in))",
            "uniform",
            1 / (3 * fi),
        ),
        ("kaiming_normal(mode='fan_in', nonlinearity='relu')", "normal", 2 / fi),
        (
            "kaiming_normal(mode='fan_out', nonlinearity='relu') (torchvision)",
            "normal",
            2 / fo,
        ),
        ("kaiming_uniform(mode='fan_in', nonlinearity='relu')", "uniform", 2 / fi),
        ("xavier_normal", "normal", 2 / (fi + fo)),
        ("xavier_uniform", "uniform", 2 / (fi + fo)),
        ("lecun_normal / normal(std=1/sqrt(fan_in))", "normal", 1 / fi),
        ("trunc_normal(std=0.02) (timm / BERT)", "normal", 0.02**2),
        ("normal(std=0.01)", "normal", 0.01**2),
        ("normal(std=1) (nn.init.normal_ default, nn.Embedding)", "normal", 1.0),
    ]


def _law(shape: str, var: float, mean: float = 0.0) -> Any:
    if shape == "uniform":
        b = math.sqrt(3 * var)
        return I.Uniform(mean - b, mean + b)
    return I.Normal(mean, math.sqrt(var))


def tensor_law(name: str, t: torch.Tensor, fans: tuple[int, int] | None) -> TensorLaw:
    """Measure ``t`` and read its law (see the module docstring)."""
    x = t.detach().double().flatten()
    n = x.numel()
    mean = float(x.mean())
    # an exactly constant tensor has variance 0 (not the rounding of its sum)
    const = n <= 1 or bool((x == x[0]).all())
    var = 0.0 if const else float(x.var(unbiased=False))
    kurt = float(((x - mean) ** 4).mean() / var**2) if var > 0 else math.nan
    fi, fo = fans if fans is not None else (n, n)
    kind = "weight" if t.dim() >= 2 else "bias" if name.endswith("bias") else "gain"
    base = dict(
        name=name,
        shape=tuple(t.shape),
        mean=mean,
        var=var,
        kurtosis=kurt,
        fan_in=fi,
        fan_out=fo,
    )
    if var == 0.0:
        src = {1.0: "ones", 0.0: "zeros"}.get(mean, f"constant({mean:g})")
        return TensorLaw(**base, law=I.Constant(mean), source=src, implied_var=0.0)
    shape = "uniform" if abs(kurt - 1.8) < abs(kurt - 3.0) else "normal"
    best = None
    if fans is not None and kind in ("weight", "bias"):
        k_c = 1.8 if shape == "uniform" else 3.0
        for desc, sh, vc in _candidates(kind, fi, fo):
            z = abs(var - vc) / (vc * math.sqrt((k_c - 1) / n))
            # below SMALL entries the kurtosis cannot tell the shapes apart
            fits = sh == shape or n < SMALL
            if fits and z <= Z_MATCH and (best is None or z < best[0]):
                best = (z, desc, vc)
    # a mean within 4 standard errors of 0 is the sampling noise of a centred law
    m = mean if abs(mean) > Z_MATCH * math.sqrt(var / n) else 0.0
    if best is not None:
        shape = next(sh for d, sh, _ in _candidates(kind, fi, fo) if d == best[1])
        return TensorLaw(
            **base, law=_law(shape, best[2]), source=best[1], implied_var=best[2]
        )
    return TensorLaw(**base, law=_law(shape, var, m), source="", implied_var=var)
