"""Initializers named and parameterised as in ``torch.nn.init``; :class:`InitScheme`.

An initializer is a small frozen object with three methods:

- ``mean(fan_in, fan_out)`` and ``variance(fan_in, fan_out)``: the exact first two
  moments of one entry (the analytic engine reads only these);
- ``sample(shape, fan_in, fan_out, rng, dtype)``: draws from a
  :class:`numpy.random.Generator` (the empirical engine).

Fans always come from the network spec: for a dense layer ``fan_in`` is the width of
its input and ``fan_out`` its width; a bias receives the fans of its layer (so
``kaiming_normal`` applied to a bias has variance ``2 / fan_in``, the "Kaiming-style
bias"); BatchNorm's gamma and beta receive ``fan_in = fan_out = `` the number of
features.

``str(init)`` is a spec string that :func:`parse` turns back into an equal object.
"""

from __future__ import annotations

import ast
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
from scipy import special

__all__ = [
    "fixup",
    "Initializer",
    "Normal",
    "Uniform",
    "Constant",
    "TruncNormal",
    "KaimingNormal",
    "KaimingUniform",
    "XavierNormal",
    "XavierUniform",
    "Orthogonal",
    "VarianceScaling",
    "TorchDefault",
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
    "trunc_normal",
    "normal",
    "uniform",
    "constant",
    "zeros",
    "ones",
    "torch_default",
    "variance_scaling",
    "calculate_gain",
    "parse",
    "InitScheme",
    "INITIALIZERS",
]

_SQRT3 = math.sqrt(3.0)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number, got {_short(value)}") from None
    except OverflowError:  # an int beyond the float range (e.g. 10**400)
        raise ValueError(
            f"{what} must be a finite number, got {_short(value)} (beyond the "
            f"float64 range)"
        ) from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return v


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters (a 400-digit integer in a message is
    noise)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[: limit - 20]}...{r[-12:]} ({len(r)} chars)"


def _nonneg(value: Any, what: str) -> float:
    v = _finite(value, what)
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return v


def _pick_fan(mode: str, fan_in: int, fan_out: int) -> float:
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    if mode == "fan_avg":
        return 0.5 * (fan_in + fan_out)
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def _check_mode(mode: Any, allowed: tuple[str, ...]) -> str:
    if mode not in allowed:
        raise ValueError(
            f"mode must be one of {', '.join(repr(m) for m in allowed)}, got {mode!r}"
        )
    return mode


# -- gains ----------------------------------------------------------------------------

_LINEAR_GAINS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
)
_GAIN_NAMES = (*_LINEAR_GAINS, "tanh", "relu", "leaky_relu", "selu")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity, as ``torch.nn.init.calculate_gain``.

    ========================  ===================================
    nonlinearity              gain
    ========================  ===================================
    linear / conv / sigmoid   1
    tanh                      5/3
    relu                      sqrt(2)
    leaky_relu                sqrt(2 / (1 + negative_slope^2))
    selu                      3/4
    ========================  ===================================

    Raises
    ------
    ValueError
        For an unknown nonlinearity (the message lists the valid names) or a bad
        ``param``.
    """
    if nonlinearity in _LINEAR_GAINS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, bool) or not isinstance(param, (int, float)):
            raise ValueError(f"negative_slope {param!r} is not a valid number")
        else:
            slope = _finite(param, "negative_slope")
        # hypot: slope**2 would overflow for |slope| > 1e154
        return math.sqrt(2.0) / math.hypot(1.0, slope)
    if nonlinearity == "selu":
        return 3.0 / 4.0
    raise ValueError(
        f"unsupported nonlinearity {nonlinearity!r}; valid: {', '.join(_GAIN_NAMES)}"
    )


# -- base -----------------------------------------------------------------------------


class Initializer:
    """Base class.  Subclasses are frozen dataclasses whose fields are their
    parameters, so ``str()`` / :func:`parse` round-trip and equality is by value."""

    name: str = "initializer"

    def mean(self, fan_in: int, fan_out: int) -> float:
        raise NotImplementedError

    def variance(self, fan_in: int, fan_out: int) -> float:
        raise NotImplementedError

    def second_moment(self, fan_in: int, fan_out: int) -> float:
        # m * m, not m ** 2: a Python float's ** raises OverflowError past 1e154
        m = self.mean(fan_in, fan_out)
        return self.variance(fan_in, fan_out) + m * m

    def sample(
        self,
        shape: int | tuple[int, ...],
        fan_in: int,
        fan_out: int,
        rng: np.random.Generator,
        dtype: Any = np.float32,
    ) -> np.ndarray:
        raise NotImplementedError

    # Distribution of one entry in closed form, for fast samplers: ("normal", mean,
    # std), ("uniform", low, high), ("constant", value, 0) or None (use sample()).
    def distribution(
        self, fan_in: int, fan_out: int
    ) -> tuple[str, float, float] | None:
        return None

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params()}


def _as_rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _fill(dist: tuple[str, float, float], shape, rng, dtype) -> np.ndarray:
    kind, p, q = dist
    rng = _as_rng(rng)
    shape = _shape(shape)
    dtype = np.dtype(dtype)
    if kind == "constant":
        return np.full(shape, p, dtype=dtype)
    gen_dtype = dtype if dtype in (np.float32, np.float64) else np.float64
    if kind == "normal":
        out = rng.standard_normal(shape, dtype=gen_dtype)
        if q != 1.0:
            out *= gen_dtype.type(q)
        if p != 0.0:
            out += gen_dtype.type(p)
    elif kind == "uniform":
        out = rng.random(shape, dtype=gen_dtype)
        out *= gen_dtype.type(q - p)
        out += gen_dtype.type(p)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return out.astype(dtype, copy=False)


class _Closed(Initializer):
    """An initializer whose entries are i.i.d. normal / uniform / constant."""

    def sample(self, shape, fan_in, fan_out, rng, dtype=np.float32):
        return _fill(self.distribution(fan_in, fan_out), shape, rng, dtype)

    def mean(self, fan_in, fan_out):
        kind, p, q = self.distribution(fan_in, fan_out)
        return 0.5 * (p + q) if kind == "uniform" else p

    def variance(self, fan_in, fan_out):
        kind, p, q = self.distribution(fan_in, fan_out)
        if kind == "normal":
            return q * q
        if kind == "uniform":
            return (q - p) * (q - p) / 12.0
        return 0.0


# -- concrete initializers ------------------------------------------------------------


@dataclass(frozen=True)
class Normal(_Closed):
    """``N(mean, std^2)`` (``torch.nn.init.normal_``)."""

    mean_: float = field(default=0.0, metadata={"alias": "mean"})
    std: float = 1.0
    name = "normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_", _finite(self.mean_, "normal mean"))
        object.__setattr__(self, "std", _nonneg(self.std, "normal std"))

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean_, "std": self.std}

    def distribution(self, fan_in, fan_out):
        return ("normal", self.mean_, self.std)


@dataclass(frozen=True)
class Uniform(_Closed):
    """``U(a, b)`` (``torch.nn.init.uniform_``)."""

    a: float = 0.0
    b: float = 1.0
    name = "uniform"

    def __post_init__(self) -> None:
        a = _finite(self.a, "uniform a")
        b = _finite(self.b, "uniform b")
        if b < a:
            raise ValueError(f"uniform needs a <= b, got a={a}, b={b}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def distribution(self, fan_in, fan_out):
        return ("uniform", self.a, self.b)


@dataclass(frozen=True)
class Constant(_Closed):
    """Every entry equal to ``val`` (``torch.nn.init.constant_``); ``zeros`` and
    ``ones`` are ``constant(0)`` and ``constant(1)``."""

    val: float = 0.0
    name = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "val", _finite(self.val, "constant val"))

    def distribution(self, fan_in, fan_out):
        return ("constant", self.val, 0.0)

    def __str__(self) -> str:
        if self.val == 0.0:
            return "zeros"
        if self.val == 1.0:
            return "ones"
        return f"constant(val={self.val!r})"


_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _upper_tail_logs(al: float, be: float) -> tuple[float, float, float]:
    """``log Z, log phi(al), log phi(be)`` for standardised bounds ``0 <= al < be``,
    ``Z = Q(al) - Q(be)`` with ``Q(x) = Phi(-x)``, all in log space so that nothing
    underflows however far in the tail the interval is."""
    la, lb = special.log_ndtr(-al), special.log_ndtr(-be)
    log_z = la + math.log(-math.expm1(lb - la))
    lpa = -0.5 * al * al - _LOG_SQRT_2PI
    lpb = -0.5 * be * be - _LOG_SQRT_2PI if math.isfinite(be) else -math.inf
    return log_z, lpa, lpb


def _truncnorm_moments(
    mean: float, std: float, a: float, b: float
) -> tuple[float, float]:
    """Mean and variance of N(mean, std^2) truncated to [a, b].

    With ``alpha = (a - mean) / std``, ``beta = (b - mean) / std`` and
    ``Z = Phi(beta) - Phi(alpha)``:
    ``E = mean + std (phi(alpha) - phi(beta)) / Z`` and
    ``Var = std^2 [1 + (alpha phi(alpha) - beta phi(beta)) / Z - ((phi(alpha) -
    phi(beta)) / Z)^2]`` (Johnson, Kotz & Balakrishnan 1994, sec. 10.1).  An
    interval entirely on one side of the mean is reflected into the upper tail and
    the ratios ``phi / Z`` are formed in log space, so the mean is accurate to
    rounding in any tail (``alpha = 10``: 10.098...; ``alpha = 40``: 40.025...); the
    variance keeps ~``16 - 2 log10(alpha)`` digits, the cancellation of its
    closed form.
    """
    if std == 0.0:
        m = min(max(mean, a), b)
        return m, 0.0
    al = (a - mean) / std
    be = (b - mean) / std
    if al >= 0 or be <= 0:
        sign = 1.0 if al >= 0 else -1.0
        lo, hi = (al, be) if al >= 0 else (-be, -al)
        log_z, lpa, lpb = _upper_tail_logs(lo, hi)
        ra = math.exp(lpa - log_z)
        rb = math.exp(lpb - log_z)
        d = ra - rb
        m = mean + sign * std * d
        tb = hi * rb if math.isfinite(hi) else 0.0
        v = std * std * (1.0 + lo * ra - tb - d * d)
        return m, max(v, 0.0)
    z = special.ndtr(be) - special.ndtr(al)
    pa = math.exp(-0.5 * al * al - _LOG_SQRT_2PI)
    pb = math.exp(-0.5 * be * be - _LOG_SQRT_2PI)
    d = (pa - pb) / z
    m = mean + std * d
    v = std * std * (1.0 + (al * pa - be * pb) / z - d * d)
    return m, max(v, 0.0)


@dataclass(frozen=True)
class TruncNormal(Initializer):
    """``N(mean, std^2)`` truncated to ``[a, b]`` (``torch.nn.init.trunc_normal_``;
    ``a`` and ``b`` are absolute bounds, as in torch).  ``variance`` is the exact
    variance of the truncated distribution, not ``std^2``."""

    mean_: float = 0.0
    std: float = 1.0
    a: float = -2.0
    b: float = 2.0
    name = "trunc_normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_", _finite(self.mean_, "trunc_normal mean"))
        object.__setattr__(self, "std", _nonneg(self.std, "trunc_normal std"))
        a = _finite(self.a, "trunc_normal a")
        b = _finite(self.b, "trunc_normal b")
        if not a < b:
            raise ValueError(f"trunc_normal needs a < b, got a={a}, b={b}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean_, "std": self.std, "a": self.a, "b": self.b}

    def mean(self, fan_in, fan_out):
        return _truncnorm_moments(self.mean_, self.std, self.a, self.b)[0]

    def variance(self, fan_in, fan_out):
        return _truncnorm_moments(self.mean_, self.std, self.a, self.b)[1]

    def sample(self, shape, fan_in, fan_out, rng, dtype=np.float32):
        return _sample_truncnorm(
            self.mean_, self.std, self.a, self.b, shape, rng, dtype
        )


def _sample_truncnorm(mean, std, a, b, shape, rng, dtype) -> np.ndarray:
    """Inverse-CDF sampling of N(mean, std^2) truncated to [a, b].

    ``x = Phi^-1(u)``, ``u ~ U(Phi(alpha), Phi(beta))``.  An interval on one side of
    the mean is reflected into the lower tail and ``u`` is drawn in log space,
    ``log u = log Phi(beta) + log1p(-v (1 - Phi(alpha) / Phi(beta)))`` with
    ``v ~ U(0, 1)``, then inverted with ``ndtri_exp`` (``Phi^-1(exp(y))``, accurate
    for any ``y < 0``): the probabilities are never rounded to 0 or 1, so the far
    tails (``alpha = 10``, where ``Phi(alpha)`` rounds to 1) are sampled exactly
    rather than piling up at a bound.
    """
    rng = _as_rng(rng)
    shape = _shape(shape)
    if std == 0.0:
        return np.full(shape, min(max(mean, a), b), dtype=dtype)
    al = (a - mean) / std
    be = (b - mean) / std
    if al >= 0 or be <= 0:
        sign = -1.0 if al >= 0 else 1.0
        lo, hi = (-be, -al) if al >= 0 else (al, be)  # now hi <= 0: lower tail
        la, lb = special.log_ndtr(lo), special.log_ndtr(hi)
        v = rng.random(size=shape)
        log_u = lb + np.log1p(-v * -math.expm1(la - lb))
        x = sign * special.ndtri_exp(log_u) * std + mean
    else:
        lo = special.ndtr(al)
        hi = special.ndtr(be)
        u = rng.uniform(lo, hi, size=shape)
        x = special.ndtri(u) * std + mean
    np.clip(x, a, b, out=x)
    return x.astype(dtype, copy=False)


@dataclass(frozen=True)
class KaimingNormal(_Closed):
    """``N(0, std^2)``, ``std = gain / sqrt(fan)`` with
    ``gain = calculate_gain(nonlinearity, a)`` (``torch.nn.init.kaiming_normal_``;
    He et al. 2015)."""

    a: float = 0.0
    mode: Literal["fan_in", "fan_out"] = "fan_in"
    nonlinearity: str = "leaky_relu"
    name = "kaiming_normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _finite(self.a, f"{self.name} a"))
        _check_mode(self.mode, ("fan_in", "fan_out"))
        calculate_gain(self.nonlinearity, self.a)

    def std(self, fan_in: int, fan_out: int) -> float:
        gain = calculate_gain(self.nonlinearity, self.a)
        return gain / math.sqrt(_pick_fan(self.mode, fan_in, fan_out))

    def distribution(self, fan_in, fan_out):
        return ("normal", 0.0, self.std(fan_in, fan_out))


@dataclass(frozen=True)
class KaimingUniform(KaimingNormal):
    """``U(-bound, bound)``, ``bound = sqrt(3) gain / sqrt(fan)``
    (``torch.nn.init.kaiming_uniform_``)."""

    name = "kaiming_uniform"

    def distribution(self, fan_in, fan_out):
        bound = _SQRT3 * self.std(fan_in, fan_out)
        return ("uniform", -bound, bound)


@dataclass(frozen=True)
class XavierNormal(_Closed):
    """``N(0, std^2)``, ``std = gain sqrt(2 / (fan_in + fan_out))``
    (``torch.nn.init.xavier_normal_``; Glorot & Bengio 2010)."""

    gain: float = 1.0
    name = "xavier_normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _nonneg(self.gain, f"{self.name} gain"))

    def std(self, fan_in: int, fan_out: int) -> float:
        return self.gain * math.sqrt(2.0 / (fan_in + fan_out))

    def distribution(self, fan_in, fan_out):
        return ("normal", 0.0, self.std(fan_in, fan_out))


@dataclass(frozen=True)
class XavierUniform(XavierNormal):
    """``U(-bound, bound)``, ``bound = gain sqrt(6 / (fan_in + fan_out))``
    (``torch.nn.init.xavier_uniform_``)."""

    name = "xavier_uniform"

    def distribution(self, fan_in, fan_out):
        bound = _SQRT3 * self.std(fan_in, fan_out)
        return ("uniform", -bound, bound)


# std of a standard normal truncated to (-2, 2), as in jax.nn.initializers
_TRUNC2_STD = 0.87962566103423978


@dataclass(frozen=True)
class VarianceScaling(Initializer):
    """``jax.nn.initializers.variance_scaling``: variance ``scale / n`` with ``n`` the
    fan picked by ``mode`` (``fan_in``, ``fan_out`` or ``fan_avg``) and one of three
    distributions: ``truncated_normal`` (truncated at two standard deviations and
    rescaled so the variance is ``scale / n``), ``normal`` or ``uniform``."""

    scale: float = 1.0
    mode: Literal["fan_in", "fan_out", "fan_avg"] = "fan_in"
    distribution_: Literal["truncated_normal", "normal", "uniform"] = "truncated_normal"
    name = "variance_scaling"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _nonneg(self.scale, "variance_scaling scale"))
        _check_mode(self.mode, ("fan_in", "fan_out", "fan_avg"))
        dist = self.distribution_
        if dist == "untruncated_normal":
            object.__setattr__(self, "distribution_", "normal")
        elif dist not in ("truncated_normal", "normal", "uniform"):
            raise ValueError(
                "distribution must be 'truncated_normal', 'normal' or 'uniform', "
                f"got {dist!r}"
            )

    def params(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution_,
        }

    def _target_var(self, fan_in, fan_out) -> float:
        return self.scale / _pick_fan(self.mode, fan_in, fan_out)

    def distribution(self, fan_in, fan_out):
        v = self._target_var(fan_in, fan_out)
        if self.distribution_ == "normal":
            return ("normal", 0.0, math.sqrt(v))
        if self.distribution_ == "uniform":
            bound = math.sqrt(3.0 * v)
            return ("uniform", -bound, bound)
        return None

    def _trunc(self, fan_in, fan_out) -> tuple[float, float]:
        s = math.sqrt(self._target_var(fan_in, fan_out)) / _TRUNC2_STD
        return s, 2.0 * s

    def mean(self, fan_in, fan_out):
        return 0.0

    def variance(self, fan_in, fan_out):
        if self.distribution_ == "truncated_normal":
            s, bound = self._trunc(fan_in, fan_out)
            return _truncnorm_moments(0.0, s, -bound, bound)[1]
        return _Closed.variance(self, fan_in, fan_out)  # type: ignore[arg-type]

    def sample(self, shape, fan_in, fan_out, rng, dtype=np.float32):
        if self.distribution_ == "truncated_normal":
            s, bound = self._trunc(fan_in, fan_out)
            return _sample_truncnorm(0.0, s, -bound, bound, shape, rng, dtype)
        return _fill(self.distribution(fan_in, fan_out), shape, rng, dtype)


@dataclass(frozen=True)
class Orthogonal(Initializer):
    """A (semi-)orthogonal matrix times ``gain`` (``torch.nn.init.orthogonal_``;
    Saxe et al. 2014), drawn by the QR decomposition of a Gaussian matrix with the
    sign correction that makes it Haar-distributed.

    For a weight of shape (fan_out, fan_in) the rows (fan_out <= fan_in) or the
    columns (fan_out > fan_in) are orthonormal, so each entry has mean 0 and
    variance ``gain^2 / max(fan_in, fan_out)`` exactly.  A 1-D parameter (a bias)
    is a unit vector times ``gain``: variance ``gain^2 / n``.
    """

    gain: float = 1.0
    name = "orthogonal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _finite(self.gain, "orthogonal gain"))

    def mean(self, fan_in, fan_out):
        return 0.0

    def variance(self, fan_in, fan_out):
        return self.gain * self.gain / max(fan_in, fan_out)

    def sample(self, shape, fan_in, fan_out, rng, dtype=np.float32):
        rng = _as_rng(rng)
        shape = _shape(shape)
        if len(shape) == 1:
            v = rng.standard_normal(shape[0])
            v /= np.linalg.norm(v) or 1.0
            # a unit vector in R^n has E[v_i^2] = 1/n; match variance() for a bias
            # of a layer with max fan n: rescale to that fan
            n = max(fan_in, fan_out)
            return (self.gain * v * math.sqrt(shape[0] / n)).astype(dtype)
        rows = shape[0]
        cols = int(np.prod(shape[1:]))
        flat = rng.standard_normal((rows, cols))
        if rows < cols:
            flat = flat.T
        q, r = np.linalg.qr(flat)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return (self.gain * q).reshape(shape).astype(dtype)


@dataclass(frozen=True)
class TorchDefault(_Closed):
    """What ``nn.Linear.reset_parameters`` does: the weight is
    ``kaiming_uniform(a=sqrt(5))`` = ``U(+-1/sqrt(fan_in))`` and the bias is
    ``U(+-1/sqrt(fan_in))`` too, so both have variance ``1 / (3 fan_in)``.  Use it
    for either (a bias receives its layer's fan_in)."""

    name = "torch_default"

    def distribution(self, fan_in, fan_out):
        bound = 1.0 / math.sqrt(fan_in)
        return ("uniform", -bound, bound)


# -- the torch-style functions --------------------------------------------------------


def normal(mean: float = 0.0, std: float = 1.0) -> Normal:
    """``N(mean, std^2)``."""
    return Normal(mean, std)


def uniform(a: float = 0.0, b: float = 1.0) -> Uniform:
    """``U(a, b)``."""
    return Uniform(a, b)


def constant(val: float) -> Constant:
    """Every entry ``val``."""
    return Constant(val)


def zeros() -> Constant:
    """Every entry 0."""
    return Constant(0.0)


def ones() -> Constant:
    """Every entry 1."""
    return Constant(1.0)


def trunc_normal(
    mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> TruncNormal:
    """``N(mean, std^2)`` truncated to ``[a, b]``."""
    return TruncNormal(mean, std, a, b)


def kaiming_normal(
    a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> KaimingNormal:
    """He-normal: ``std = calculate_gain(nonlinearity, a) / sqrt(fan)``."""
    return KaimingNormal(a, mode, nonlinearity)  # type: ignore[arg-type]


def kaiming_uniform(
    a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> KaimingUniform:
    """He-uniform: ``bound = sqrt(3) calculate_gain(nonlinearity, a) / sqrt(fan)``."""
    return KaimingUniform(a, mode, nonlinearity)  # type: ignore[arg-type]


def xavier_normal(gain: float = 1.0) -> XavierNormal:
    """Glorot-normal: ``std = gain sqrt(2 / (fan_in + fan_out))``."""
    return XavierNormal(gain)


def xavier_uniform(gain: float = 1.0) -> XavierUniform:
    """Glorot-uniform: ``bound = gain sqrt(6 / (fan_in + fan_out))``."""
    return XavierUniform(gain)


def variance_scaling(
    scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal"
) -> VarianceScaling:
    """jax's ``variance_scaling``: variance ``scale / fan``."""
    return VarianceScaling(scale, mode, distribution)  # type: ignore[arg-type]


def lecun_normal() -> VarianceScaling:
    """LeCun-normal as in jax: truncated normal with variance ``1 / fan_in``."""
    return VarianceScaling(1.0, "fan_in", "truncated_normal")


def lecun_uniform() -> VarianceScaling:
    """LeCun-uniform as in jax: ``U(+-sqrt(3 / fan_in))``, variance ``1 / fan_in``."""
    return VarianceScaling(1.0, "fan_in", "uniform")


def orthogonal(gain: float = 1.0) -> Orthogonal:
    """Haar-orthogonal times ``gain``."""
    return Orthogonal(gain)


def torch_default() -> TorchDefault:
    """``nn.Linear``'s default: ``U(+-1/sqrt(fan_in))`` for weight and bias."""
    return TorchDefault()


INITIALIZERS: dict[str, Any] = {
    "normal": normal,
    "uniform": uniform,
    "constant": constant,
    "zeros": zeros,
    "ones": ones,
    "trunc_normal": trunc_normal,
    "kaiming_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
    "lecun_normal": lecun_normal,
    "lecun_uniform": lecun_uniform,
    "orthogonal": orthogonal,
    "torch_default": torch_default,
    "variance_scaling": variance_scaling,
}
# torch's trailing-underscore names and a few common spellings
_ALIASES = {
    "he_normal": "kaiming_normal",
    "he_uniform": "kaiming_uniform",
    "glorot_normal": "xavier_normal",
    "glorot_uniform": "xavier_uniform",
    "truncated_normal": "trunc_normal",
    "zero": "zeros",
    "one": "ones",
    "default": "torch_default",
}


# -- parsing (no eval) ----------------------------------------------------------------

#: longest initializer string parsed (the longest real one, a variance_scaling call
#: with every keyword spelled out, is ~100 characters; the parser's memory grows
#: with the nesting of what it is given)
MAX_SPEC_LENGTH = 1000


def _literal(node: ast.AST, spec: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(
            f"in initializer {spec!r}: arguments must be plain numbers or quoted "
            f"strings, got {ast.unparse(node)!r}"
        ) from None
    if not isinstance(value, (int, float, str, bool)) or isinstance(value, complex):
        raise ValueError(
            f"in initializer {spec!r}: arguments must be plain numbers or quoted "
            f"strings, got {ast.unparse(node)!r}"
        )
    return value


def _build(
    name: str, args: list[Any], kwargs: dict[str, Any], spec: str
) -> Initializer:
    key = name.strip().lower().rstrip("_")
    key = _ALIASES.get(key, key)
    if key not in INITIALIZERS:
        raise ValueError(
            f"unknown initializer {name!r}; valid names: "
            f"{', '.join(sorted(INITIALIZERS))}"
        )
    try:
        return INITIALIZERS[key](*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments in initializer {spec!r}: {exc}") from None


def parse(spec: Any) -> Initializer:
    """Turn a spec into an :class:`Initializer`, without ``eval``.

    Accepted forms: an Initializer (returned as is); a number (``constant``); a
    string, a bare name (``"zeros"``) or a call with literal arguments
    (``"kaiming_uniform(a=2.23606797749979, mode='fan_in')"``,
    ``"normal(0, 0.01)"``); a table ``{"name": "normal", "std": 0.01}``.

    Raises
    ------
    ValueError
        Unknown initializer (the valid names are listed), bad arguments, or a
        string that is anything but a name with literal arguments (such as
        ``"__import__('os')"``): it is rejected, never executed.
    """
    if isinstance(spec, Initializer):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"an initializer spec cannot be a bool, got {spec!r}")
    if isinstance(spec, (int, float, np.integer, np.floating)):
        return Constant(spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        name = d.pop("name", None)
        if name is None:
            name = d.pop("type", None)
        if not isinstance(name, str):
            raise ValueError(
                f"initializer table needs a 'name' key such as "
                f'{{name = "normal", std = 0.01}}, got {spec!r}'
            )
        return _build(name, [], d, str(spec))
    if not isinstance(spec, str):
        raise TypeError(
            f"an initializer spec must be a string, a table or an Initializer, "
            f"got {type(spec).__name__}"
        )
    text = spec.strip()
    if not text:
        raise ValueError("empty initializer spec; e.g. 'zeros' or 'normal(std=0.01)'")
    if len(text) > MAX_SPEC_LENGTH:
        raise ValueError(
            f"initializer spec of {len(text)} characters is longer than the limit "
            f"of {MAX_SPEC_LENGTH}; e.g. 'normal(std=0.01)'"
        )
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ValueError(
            f"cannot parse initializer {spec!r}; expected a name with literal "
            f'arguments such as "normal(std=0.01)"'
        ) from None
    if isinstance(tree, ast.Name):
        return _build(tree.id, [], {}, spec)
    if isinstance(tree, ast.Constant) and isinstance(tree.value, (int, float)):
        return parse(tree.value)
    if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
        return parse(-_literal(tree.operand, spec))
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise ValueError(
            f"initializer {spec!r} is not a name with literal arguments "
            f"(e.g. \"kaiming_normal(mode='fan_out')\"); it was not executed"
        )
    if any(isinstance(a, ast.Starred) for a in tree.args) or any(
        k.arg is None for k in tree.keywords
    ):
        raise ValueError(f"initializer {spec!r}: *args / **kwargs are not allowed")
    args = [_literal(a, spec) for a in tree.args]
    kwargs = {k.arg: _literal(k.value, spec) for k in tree.keywords}
    return _build(tree.func.id, args, kwargs, spec)


# -- a scheme for a whole network -----------------------------------------------------

_SLOTS = ("weight", "bias", "bn_weight", "bn_bias")


def _leaf_targets(
    infos: Any, rows: list[int], leaf: str, whole: bool = False
) -> list[int]:
    """Rows among ``rows`` a selector leaf names (see InitScheme._selector_targets):
    ``family[k]`` or a glob on the row's own name (the full name when ``whole``)."""
    if leaf.endswith("]") and "[" in leaf:
        family, _, idx = leaf[:-1].partition("[")
        family = family.strip().lower()
        try:
            k = int(idx)
        except ValueError:
            return []
        of_kind = [
            i
            for i in rows
            if family in (infos[i].layer.prefix, *infos[i].layer.selector_aliases)
        ]
        return [of_kind[k]] if -len(of_kind) <= k < len(of_kind) else []
    if not any(ch in leaf for ch in "*?["):
        return []
    return [
        i
        for i in rows
        if fnmatch.fnmatchcase(
            infos[i].name if whole else infos[i].name.rpartition(".")[2], leaf
        )
    ]


def _layer_scheme_keys() -> dict[str, str]:
    """Scheme keys the registered layer kinds declare beyond the four fields
    (e.g. LayerNorm's ``ln_weight`` / ``ln_bias``), with their default specs."""
    from .layers import LAYER_TYPES

    keys: dict[str, str] = {}
    for cls in set(LAYER_TYPES.values()):
        for slot in getattr(cls, "slot_table", ()):
            if slot.scheme not in _SLOTS:
                keys.setdefault(slot.scheme, slot.default)
    return keys


def _override_keys() -> dict[str, str]:
    """Override table keys -> slot names: the slot names of every registered layer
    kind and their aliases (BatchNorm's ``gamma`` / ``beta``), and the scheme keys
    (``bn_weight`` -> ``weight``)."""
    from .layers import LAYER_TYPES

    keys = {"weight": "weight", "bias": "bias"}
    for cls in set(LAYER_TYPES.values()):
        for slot in getattr(cls, "slot_table", ()):
            keys[slot.name] = slot.name
            keys[slot.scheme] = slot.name
            for a in slot.aliases:
                keys[a] = slot.name
    return keys


def fixup(
    blocks: int, branch_depth: int = 2, zero_last: bool = True, base: Any = None
) -> InitScheme:
    """The Fixup initialisation (Zhang, Dauphin & Ma 2019, rules 1-2) of a network
    with ``blocks`` residual blocks (L) of ``branch_depth`` dense layers (m),
    as an :class:`InitScheme` over ``base``: the last Dense of every branch zero
    (``zero_last``), the others He-normal scaled by ``L^(-1/(2m - 2))`` (variance
    ``2 L^(-1/(m - 1)) / fan_in``).  With ``zero_last=False`` every branch Dense is
    scaled (the "scaling alone" variant: the stream grows by ``1 + L^(-m/(m-1))``
    per block, ``(1 + 1/L^2)`` for m = 2).  Rows are addressed as
    ``block*.dense[k]`` (see :class:`InitScheme`)."""
    L = int(blocks)
    m = int(branch_depth)
    if L < 1 or m < 2:
        raise ValueError(
            f"fixup needs blocks >= 1 and branch_depth >= 2, got {blocks}, "
            f"{branch_depth}"
        )
    scaled = VarianceScaling(2.0 * L ** (-1.0 / (m - 1)), "fan_in", "normal")
    over: dict[str, Any] = {
        f"block*.dense[{j}]": {"weight": scaled} for j in range(m - 1)
    }
    over[f"block*.dense[{m - 1}]"] = {"weight": Constant(0.0) if zero_last else scaled}
    return InitScheme.from_spec(base).with_overrides(over)


def _default_weight() -> Initializer:
    return KaimingNormal(0.0, "fan_in", "relu")


@dataclass(frozen=True)
class InitScheme:
    """How every parameter of a network is initialised.

    Parameters
    ----------
    weight, bias : initializer spec
        Dense weights and biases (default: ``kaiming_normal(nonlinearity='relu')`` and
        ``zeros``).
    bn_weight, bn_bias : initializer spec
        BatchNorm gamma and beta (default: ``ones`` and ``zeros``).
    overrides : mapping
        Per-layer overrides: ``{selector: {"weight": spec, "bias": spec}}``.  A
        selector is a layer name (``"dense30"``, ``"bn3"``) or a kind with a
        Python-style index counted over layers of that kind: ``"dense[-1]"`` (the
        last dense layer), ``"bn[0]"`` (the first BatchNorm).  For a BatchNorm,
        ``gamma`` / ``beta`` are accepted for ``weight`` / ``bias``.

    Every spec goes through :func:`parse`.
    """

    weight: Any = field(default_factory=_default_weight)
    bias: Any = field(default_factory=zeros)
    bn_weight: Any = field(default_factory=ones)
    bn_bias: Any = field(default_factory=zeros)
    overrides: Any = field(default_factory=dict)
    extra: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        for slot in _SLOTS:
            try:
                object.__setattr__(self, slot, parse(getattr(self, slot)))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"InitScheme {slot}: {exc}") from None
        if not isinstance(self.extra, Mapping):
            raise TypeError(
                f"InitScheme extra must be a mapping {{key: spec}}, got "
                f"{type(self.extra).__name__}"
            )
        known = _layer_scheme_keys()
        extra = {}
        for k, v in self.extra.items():
            if k not in known:
                raise ValueError(
                    f"InitScheme: unknown key {k!r}; valid keys: "
                    f"{', '.join((*_SLOTS, *sorted(known), 'overrides'))}"
                )
            try:
                extra[k] = parse(v)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"InitScheme {k}: {exc}") from None
        object.__setattr__(self, "extra", extra)
        override_keys = _override_keys()
        if not isinstance(self.overrides, Mapping):
            raise TypeError(
                f"InitScheme overrides must be a mapping {{selector: {{'weight': "
                f"spec}}}}, got {type(self.overrides).__name__}"
            )
        clean: dict[str, dict[str, Initializer]] = {}
        for sel, table in self.overrides.items():
            if not isinstance(table, Mapping):
                raise TypeError(
                    f"InitScheme override {sel!r} must be a table such as "
                    f"{{'weight': 'zeros'}}, got {table!r}"
                )
            entry = {}
            for k, v in table.items():
                if k not in override_keys:
                    raise ValueError(
                        f"InitScheme override {sel!r}: unknown key {k!r}; valid keys: "
                        f"{', '.join(override_keys)}"
                    )
                try:
                    entry[override_keys[k]] = parse(v)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"InitScheme override {sel!r} {k}: {exc}") from None
            clean[str(sel)] = entry
        object.__setattr__(self, "overrides", clean)

    def __hash__(self) -> int:
        return hash(
            (
                self.weight,
                self.bias,
                self.bn_weight,
                self.bn_bias,
                tuple(
                    sorted(
                        (k, tuple(sorted(v.items()))) for k, v in self.overrides.items()
                    )
                ),
                tuple(sorted(self.extra.items())),
            )
        )

    @classmethod
    def from_spec(cls, spec: Any) -> InitScheme:
        """From an InitScheme, ``None`` (default) or a table with the slot names."""
        if spec is None:
            return cls()
        if isinstance(spec, InitScheme):
            return spec
        if isinstance(spec, Mapping):
            spec = dict(spec)
            known = _layer_scheme_keys()
            extra = dict(spec.pop("extra", {}) or {})
            extra.update({k: spec.pop(k) for k in list(spec) if k in known})
            unknown = set(spec) - set(_SLOTS) - {"overrides"}
            if unknown:
                raise ValueError(
                    f"unknown InitScheme keys {sorted(unknown)}; valid keys: "
                    f"{', '.join((*_SLOTS, *sorted(known), 'overrides'))}"
                )
            return cls(**spec, extra=extra)
        raise TypeError(
            f"init must be an InitScheme or a table, got {type(spec).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {slot: str(getattr(self, slot)) for slot in _SLOTS}
        d.update({k: str(v) for k, v in self.extra.items()})
        if self.overrides:
            d["overrides"] = {
                sel: {k: str(v) for k, v in table.items()}
                for sel, table in self.overrides.items()
            }
        return d

    # -- resolution against a network --------------------------------------------
    def get(self, key: str, default: Any) -> Initializer:
        """The initializer of scheme key ``key`` (a field, an ``extra`` key, or the
        layer's ``default`` spec)."""
        if key in _SLOTS:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        return parse(default)

    def _selector_targets(self, network: Any, sel: str) -> list[int]:
        """Rows a selector names: an exact row name (``"block3.bn2"``); else
        ``scope.leaf`` with a scope pattern matched segment by segment
        (``"block*"``) and the leaf applied within each matching scope; the leaf
        (or a selector without a dot) is a glob on the row's own name (``"bn*"``)
        or ``family[k]``, the k-th layer of that family in the scope (over the
        whole network without a dot: ``"dense[-1]"`` is the last dense layer)."""
        infos = network.infos
        by_name = [i for i, info in enumerate(infos) if info.name == sel]
        if by_name:
            return by_name
        scope, dot, leaf = sel.rpartition(".")
        if not dot:
            return _leaf_targets(infos, list(range(len(infos))), sel, whole=True)
        pattern = scope.split(".")
        groups: dict[str, list[int]] = {}
        for i, info in enumerate(infos):
            own = info.name.rpartition(".")[0].split(".")
            if len(own) == len(pattern) and all(
                fnmatch.fnmatchcase(o, p) for o, p in zip(own, pattern, strict=True)
            ):
                groups.setdefault(".".join(own), []).append(i)
        return [t for rows in groups.values() for t in _leaf_targets(infos, rows, leaf)]

    def check_overrides(self, network: Any) -> None:
        """Raise ValueError for a selector that matches no layer with parameters."""
        for sel in self.overrides:
            targets = self._selector_targets(network, sel)
            ok = [i for i in targets if network.infos[i].layer.slots()]
            if not ok:
                names = [i.name for i in network.infos if i.layer.slots()]
                shown = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
                raise ValueError(
                    f"InitScheme override {sel!r} matches no layer with parameters; "
                    f"use a layer name ({shown}), 'dense[-1]' / 'bn[0]', or "
                    "'block*.bn[-1]' for a layer of every residual block"
                )

    def resolve(self, network: Any) -> list[dict[str, Any]]:
        """Per layer, ``{slot name: initializer}`` (overrides applied); a slot the
        layer kind has but this layer does not use (a bias-free Dense, a
        normalisation without ``affine``) maps to None."""
        out: list[dict[str, Any]] = []
        for info in network.infos:
            used = info.layer.slots()
            own = info.layer.own_inits()
            out.append(
                {
                    s.name: (
                        parse(own[s.name])
                        if s.name in own
                        else self.get(s.scheme, s.default)
                    )
                    if s in used
                    else None
                    for s in info.layer.slot_table
                }
            )
        for sel, table in self.overrides.items():
            for i in self._selector_targets(network, sel):
                for k, v in table.items():
                    if out[i].get(k) is not None:
                        out[i][k] = v
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> InitScheme:
        merged = {**self.overrides, **dict(overrides)}
        return InitScheme(
            self.weight, self.bias, self.bn_weight, self.bn_bias, merged, self.extra
        )
