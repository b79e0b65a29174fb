"""Normalisation layers (BatchNorm over the batch, LayerNorm over the features):
spec, mean-field rule, empirical step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import mfstate
from .base import Layer, Slot, check_bool, check_finite, register
from .dense import is_zero_init

__all__ = ["BatchNorm", "LayerNorm"]


def _collapse(comps: list) -> list:
    """Components that differ only by a shift the centring removed (a Dense bias
    law's nodes) stand as one."""
    w0, m0, S0 = comps[0]
    scale = max(float(np.max(np.abs(S0))), 1e-300)
    if len(comps) > 1 and all(
        np.max(np.abs(mk - m0)) <= 1e-12 * math.sqrt(scale)
        and np.max(np.abs(Sk - S0)) <= 1e-12 * scale
        for _, mk, Sk in comps
    ):
        return [(float(sum(c[0] for c in comps)), m0, S0)]
    return comps


class _Norm(Layer):
    """What BatchNorm and LayerNorm share: gamma / beta slots, the fans
    ``(n, n)``, the zero-by-design rules and the parameter-node mixture."""

    eps: float
    affine: bool

    def _check(self, what: str) -> None:
        object.__setattr__(
            self, "eps", check_finite(self.eps, f"{what} eps", positive=True)
        )
        check_bool(self.affine, f"{what} affine")

    def slots(self) -> tuple[Slot, ...]:
        return self.slot_table if self.affine else ()

    def output_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        if not self.affine:
            return False
        n = width
        return is_zero_init(inits["weight"], n, n) and is_zero_init(inits["bias"], n, n)

    def input_grad_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        return self.affine and is_zero_init(inits["weight"], width, width)

    def mf_parameters(self, p: dict[str, Any], fan_in: int, width: int) -> dict:
        n = width
        if not self.affine:
            return {
                "norm": self.kind,
                "gamma_mean": 1.0,
                "gamma_var": 0.0,
                "beta_mean": 0.0,
                "beta_var": 0.0,
                "gamma2": 1.0,
                "beta2": 0.0,
            }
        g, b = p["weight"], p["bias"]
        return {
            "norm": self.kind,
            "gamma_mean": g.mean(n, n),
            "gamma_var": g.variance(n, n),
            "beta_mean": b.mean(n, n),
            "beta_var": b.variance(n, n),
            "gamma2": g.second_moment(n, n),
            "beta2": b.second_moment(n, n),
        }

    def _laws(self, ctx: Any) -> tuple[float, float, float, float]:
        """(mean, variance) of gamma and beta."""
        m = self.mf_parameters(ctx.params, ctx.info.fan_in, ctx.info.width)
        return m["gamma_mean"], m["gamma_var"], m["beta_mean"], m["beta_var"]

    def _nodes(self, ctx: Any):
        """Quadrature nodes of gamma and beta (a point mass each without affine)."""
        if not self.affine:
            return np.ones(1), np.ones(1), np.zeros(1), np.ones(1)
        n = ctx.info.width
        gn, gw = mfstate.param_nodes(ctx.params["weight"], n, "gamma", ctx.info.name)
        bn_, bw = mfstate.param_nodes(ctx.params["bias"], n, "beta", ctx.info.name)
        return gn, gw, bn_, bw

    def _mixture(self, ctx: Any, comps) -> mfstate.Gauss:
        """The output mixture: every input component (w, normalised mean, cov)
        times every (gamma, beta) node: ``(gamma m + beta, gamma^2 S)``."""
        gn, gw, bn_, bw = self._nodes(ctx)
        GG, BB = np.meshgrid(gn, bn_, indexing="ij")
        WW = np.outer(gw, bw)
        out_w, out_m, out_S, out_g, out_b = [], [], [], [], []
        for wk, mk, Sk in comps:
            for gam, bet, wgb in zip(GG.ravel(), BB.ravel(), WW.ravel(), strict=True):
                out_w.append(wk * wgb)
                out_m.append(gam * mk + bet)
                out_S.append(gam * gam * Sk)
                out_g.append(gam)
                out_b.append(bet)
        return mfstate.Gauss(
            np.array(out_w),
            np.array(out_m),
            np.array(out_S),
            np.array(out_g),
            np.array(out_b),
        )

    def _params_or_unit(self, ctx: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.affine:
            return ctx.params["weight"], ctx.params["bias"]
        n = ctx.info.width
        return np.ones(n, dtype=ctx.dt), np.zeros(n, dtype=ctx.dt)

    def _gamma_beta_norms(self, ctx: Any, grad: mfstate.GradState, en2: float) -> None:
        """``||dgamma||^2 = N E[g^2 n^2]``, ``||dbeta||^2 = N q~`` (independent
        examples), with ``E[g^2 n^2] = q~_above E[phi'(y)^2 n^2]`` when the gradient
        came through an activation directly above (gamma / beta random: per
        mixture component), else ``q~ E[n^2]``."""
        if not self.affine:
            return
        nf = ctx.info.width
        g = ctx.state.gauss
        qt = grad.total(ctx.state)
        ctx.row["beta_grad_norm2"] = nf * qt
        if g is not None and grad.through is not None and self._aligned(grad, g):
            act, qu = grad.through
            ctx.row["gamma_grad_norm2"] = (
                nf * qu * float(g.w @ mfstate.gamma_moment(act, g))
            )
        else:
            ctx.row["gamma_grad_norm2"] = nf * qt * en2

    @staticmethod
    def _aligned(grad: mfstate.GradState, g: mfstate.Gauss) -> bool:
        return grad.comp.size == g.w.size

    def _gain_numerator(self, ctx: Any, grad: mfstate.GradState) -> float:
        """E[gamma^2 q~ | gamma] per component when the gradient depends on gamma
        through the activation above, else E[gamma^2] q~."""
        g = ctx.state.gauss
        if g is not None and grad.through is not None and self._aligned(grad, g):
            return float(g.w @ (g.gamma**2 * grad.comp))
        gm, gv, _, _ = self._laws(ctx)
        return (gv + gm * gm) * grad.total(ctx.state)

    # -- empirical step (both kinds; ``_kernels`` names the normalisation) --------
    def _kernels(self, ops: Any):
        raise NotImplementedError

    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        gamma, beta = self._params_or_unit(ctx)
        out, mean, invstd = self._kernels(ctx.ops)[0](x, gamma, beta, self.eps)
        return out, (x, (mean, invstd), gamma, beta)

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        xin, sv, gamma, beta = saved
        gin, dgamma, dbeta = self._kernels(ctx.ops)[1](g, xin, sv, gamma, beta)
        sums = {}
        if self.affine:
            for col, d in (("gamma_grad_norm2", dgamma), ("beta_grad_norm2", dbeta)):
                sums[col] = float(np.dot(d.astype(np.float64), d))
        return (gin if need_input_grad else None), sums

    def param_grads(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        xin, sv, gamma, beta = saved
        gin, dgamma, dbeta = self._kernels(ctx.ops)[1](g, xin, sv, gamma, beta)
        grads = {}
        if self.affine:
            grads["weight"] = ctx.grads["weight"]
            grads["weight"][...] = dgamma
            grads["bias"] = ctx.grads["bias"]
            grads["bias"][...] = dbeta
        return (gin if need_input_grad else None), grads

    def fusion(self) -> tuple | None:
        return None


@dataclass(frozen=True)
class BatchNorm(_Norm):
    """Batch normalisation in training mode (biased batch statistics, as at step 0).

    ``y = gamma * (x - mean_B(x)) / sqrt(var_B(x) + eps) + beta`` per feature, with
    ``gamma`` (torch: ``weight``) and ``beta`` (torch: ``bias``) initialised by the
    network's :class:`~initdiag.initializers.InitScheme` (``bn_weight`` /
    ``bn_bias``); ``affine=False`` has neither (gamma = 1, beta = 0 fixed).
    """

    eps: float = 1e-5
    affine: bool = True

    kind = "batchnorm"
    type_name = "batchnorm"
    prefix = "bn"
    selector_aliases = ("batchnorm",)
    slot_table = (
        Slot("weight", "bn_weight", "ones", aliases=("gamma",)),
        Slot("bias", "bn_bias", "zeros", aliases=("beta",)),
    )

    def __post_init__(self) -> None:
        self._check("BatchNorm")

    def describe(self, fan_in: int, width: int) -> str:
        return "BN" if self.affine else "BN(affine=False)"

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """Large-batch limit (Yang et al. 2019; docs/theory.md section 4): with the
        centring C = I - 11^T/B and s2 = mean(diag(C K C)) the per-unit batch
        variance, ``n = C h / sqrt(s2 + eps)`` and
        ``K_BN = E[gamma^2] C K C/(s2 + eps) + mu_g mu_b (C ex 1^T + 1 (C ex)^T) /
        sqrt(s2 + eps) + E[beta^2] 11^T``, ``ex_BN = mu_g C ex / sqrt(s2 + eps) +
        mu_b``.  A dense bias directly before is cancelled by the centring.  For the
        activation after it, gamma and beta are integrated by quadrature over their
        distribution (Gauss-Legendre for uniform, Gauss-Hermite for normal)."""
        batch = ctx.batch
        if batch.B is not None:
            fin = self._finite_forward(ctx, state)
            if fin is not None:
                return fin
        mg, vg, mb, vb = self._laws(ctx)
        CKC = batch.centre(state.K)
        s2 = float(np.mean(np.diag(CKC)))
        den = s2 + self.eps
        cex = batch.centre_vec(state.ex)
        one = np.ones_like(state.ex)
        K = (
            (vg + mg * mg) * CKC / den
            + mg * mb * (np.outer(cex, one) + np.outer(one, cex)) / math.sqrt(den)
            + (vb + mb * mb) * np.outer(one, one)
        )
        ex = mg * cex / math.sqrt(den) + mb
        ctx.extra.update(s2=s2, den=den)
        if state.gauss is None:
            why = (
                f"the input of {ctx.info.name} is not Gaussian ({state.why_not_gauss})"
            )
            return mfstate.State(ex, K, None, why)
        try:
            comps = []
            for wk, mk, Sk in zip(
                state.gauss.w, state.gauss.m, state.gauss.S, strict=True
            ):
                # the centred input is Gaussian (mixture): recentre each component
                Cm = batch.centre_vec(mk)
                CSC = batch.centre(Sk + np.outer(mk, mk)) - np.outer(Cm, Cm)
                comps.append((wk, Cm / math.sqrt(den), CSC / den))
            g = self._mixture(ctx, _collapse(comps))
        except NotImplementedError as exc:
            return mfstate.State(ex, K, None, str(exc))
        return mfstate.State(ex, K, g)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``q~_in = E[gamma^2 q~_out | gamma] / (s2 + eps)`` (Yang et al. 2019; per
        block the gain gamma^2 E[phi'^2]/Var[phi], pi/(pi - 1) for ReLU), times
        (B - 2)/(B - 3) at a finite ``batch_size`` when the output gradient does not
        depend on the BatchNorm output and the input is an exchangeable Gaussian
        batch (exact for linear BN networks, docs/theory.md section 4); otherwise the
        large-batch limit.  The input gradient is centred over the batch."""
        if "finite" in ctx.extra:
            return self._finite_backward(ctx, grad)
        s2, den = ctx.extra["s2"], ctx.extra["den"]
        self._gamma_beta_norms(ctx, grad, s2 / den)
        gain = self._gain_numerator(ctx, grad) / den
        B = ctx.batch.B
        if (
            B is not None
            and ctx.batch.equi
            and grad.independent
            and ctx.input_state.gauss is not None
            and B > 3
        ):
            gain *= (B - 2) / (B - 3)
        return mfstate.GradState(np.array([gain]), centred=True, independent=False)

    # -- finite batch (docs/theory.md, "Finite-batch BatchNorm") ----------------
    def _fb_laws(self, ctx: Any):
        from .. import finite_batch as fb

        if not self.affine:
            return fb.Law("constant", 1.0), fb.Law("constant", 0.0)
        n = ctx.info.width
        return fb.Law.of(ctx.params["weight"], n), fb.Law.of(ctx.params["bias"], n)

    def _finite_forward(self, ctx: Any, state: mfstate.State):
        """At a finite batch (Yang et al. 2019): a Gaussian input (a dense output)
        gives the BatchNorm output on the sphere of the centred subspace (the
        activation after it integrates over that law); an activation of a Gaussian
        (BatchNorm after the activation) is integrated by Monte Carlo over the
        Gaussian.  Other inputs: None (the large-batch rule)."""
        from .. import finite_batch as fb

        batch, B = ctx.batch, ctx.batch.B
        try:
            gamma, beta = self._fb_laws(ctx)
        except NotImplementedError:
            return None
        why = f"{ctx.info.name} output is a finite-batch BatchNorm (not Gaussian)"
        g = state.gauss
        if g is not None and g.w.size == 1:
            m, S = g.m[0], g.S[0]
            if batch.equi:
                a = float(S[0, 0] - S[0, 1])
                st = fb.bn_pre_exchangeable(None, B, gamma, beta, a, self.eps)
                ex = np.full(2, st.bn_mean)
                K = np.array([[st.bn_kd, st.bn_ko], [st.bn_ko, st.bn_kd]])
                active, dead = st.bn_active, st.dead
                err = max(st.error, st.dead_se)
                unit = {
                    "kind": "bn_pre",
                    "gamma": gamma,
                    "beta": beta,
                    "a": a,
                    "eps": self.eps,
                }
            else:
                cache: dict = {}

                def make(act, m=m, S=S, cache=cache):
                    key = None if act is None else act
                    if key not in cache:
                        cache[key] = fb.BNMonteCarlo(
                            act, "pre", m, S, gamma, beta, self.eps
                        )
                    return cache[key]

                r = make(None).rows["bn"]
                ex, K, active, dead = r.mean, r.K, r.active, r.dead
                err = r.K_se / max(float(np.mean(np.diag(K))), 1e-300)
                unit = {"kind": "bn_pre", "mc": make}
            ctx.extra.update(finite="pre", unit=unit, integration_error=err)
        elif state.unit is not None and state.unit["kind"] == "act_of":
            gi = state.unit["gauss"]
            if gi.w.size != 1:
                return None
            m, S = gi.m[0], gi.S[0]
            if batch.equi:
                mc = fb.bn_post_exchangeable(
                    state.unit["act"],
                    B,
                    float(m[0]),
                    float(S[0, 0]),
                    float(S[0, 1]),
                    gamma,
                    beta,
                    self.eps,
                )
                r = mc.rows["bn"]
                # exact given E[r^2]: E n_a = 0, E n_a n_b = -E n_a^2/(B-1)
                kd, ko = fb.bn_row_kernel(gamma, beta, mc.rho, B)
                ex = np.full(2, beta.mean)
                K = np.array([[kd, ko], [ko, kd]])
            else:
                mc = fb.BNMonteCarlo(
                    state.unit["act"], "post", m, S, gamma, beta, self.eps
                )
                r = mc.rows["bn"]
                ex, K = r.mean, r.K
            active, dead = r.active, r.dead
            err = max(r.K_se / max(float(np.mean(np.diag(K))), 1e-300), r.dead_se)
            ctx.extra.update(finite="post", mc=mc, integration_error=err)
        else:
            return None
        ctx.row["active_fraction"], ctx.row["dead_fraction"] = active, dead
        return mfstate.State(
            ex, K, None, why, unit=unit if ctx.extra["finite"] == "pre" else None
        )

    def _finite_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """The batch kernel of gradients through BatchNorm at a finite batch:
        ``G_in = E[gamma^2/(s + eps) P D G D P]`` (BN before the activation, D =
        diag phi' of the BN output, G at the activation output) or
        ``E[gamma^2/(s + eps) D P G P D]`` (after it; D = diag phi' of the dense
        output), ``P = C - n n^T / B``; ``||dgamma||^2 = N (1/B) E[(sum_b g_b
        phi'_b n_b)^2]``, ``||dbeta||^2 = N (1/B) E[(sum_b g_b phi'_b)^2]``
        (docs/theory.md, "Finite-batch BatchNorm")."""
        from .. import finite_batch as fb

        nf = ctx.info.width
        batch = ctx.batch
        G = grad.through_kernel if grad.through_kernel is not None else grad.kernel
        if G is None:
            G = mfstate.kernel_from_scalar(grad.total(ctx.state), batch, grad.centred)
        if ctx.extra["finite"] == "pre":
            act = grad.through[0] if grad.through_kernel is not None else None
            unit = ctx.extra["unit"]
            if batch.equi:
                gamma, beta = unit["gamma"], unit["beta"]
                st = fb.bn_pre_exchangeable(
                    act, batch.B, gamma, beta, unit["a"], unit["eps"]
                )
                _, gin, gam, bet = st.backward(G)
            else:
                out = unit["mc"](act).backward(G)
                gin, gam, bet = out["in"], out["gamma"], out["beta"]
            below = None
        else:
            out = ctx.extra["mc"].backward(G)
            gin, below, gam, bet = out["mid"], out["in"], out["gamma"], out["beta"]
        if self.affine:
            ctx.row["gamma_grad_norm2"] = nf * gam
            ctx.row["beta_grad_norm2"] = nf * bet
        return mfstate.GradState(
            np.array([mfstate.kernel_diag(gin)]),
            centred=True,
            independent=False,
            kernel=gin,
            below=below,
        )

    # -- empirical step -----------------------------------------------------------
    def _kernels(self, ops: Any):
        return ops.bn, ops.bn_backward

    # -- training: running statistics (torch.nn.BatchNorm1d's) ---------------------
    def running_state(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(running mean, running variance), torch's zeros and ones, in float64."""
        return np.zeros(width), np.ones(width)

    def update_running(self, ctx: Any, saved: Any, momentum: float) -> None:
        """``r <- (1 - momentum) r + momentum s`` with the batch mean and the
        *unbiased* batch variance ``var B / (B - 1)`` (torch's convention; the
        forward normalised with the biased one), the variance recovered from the
        saved ``1 / sqrt(var + eps)``."""
        _, (mean, invstd), _, _ = saved
        B = ctx.B
        var = 1.0 / np.square(invstd.astype(np.float64)) - self.eps
        rm, rv = ctx.extra["running"]
        rm *= 1.0 - momentum
        rm += momentum * mean
        rv *= 1.0 - momentum
        rv += (momentum * B / max(B - 1, 1)) * var

    def infer(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        """``gamma (x - running_mean) / sqrt(running_var + eps) + beta``."""
        gamma, beta = self._params_or_unit(ctx)
        rm, rv = ctx.extra["running"]
        s = gamma / np.sqrt(rv + self.eps)
        return (x * s.astype(x.dtype) + (beta - rm * s).astype(x.dtype)).astype(
            x.dtype, copy=False
        )

    def _scale(self, saved: Any, exact: bool) -> np.ndarray:
        _, (_, invstd), gamma, _ = saved
        s = (gamma * invstd).astype(gamma.dtype)
        return s.astype(np.float64) if exact else s

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        return t * self._scale(saved, example is not None)

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        return g * self._scale(saved, False)

    def fusion(self) -> tuple:
        return ("batch_affine", self.eps)


@dataclass(frozen=True)
class LayerNorm(_Norm):
    """Layer normalisation, per example over the features, as ``torch.nn.LayerNorm``:
    ``y[b] = gamma * (x[b] - mean_j x[b, j]) / sqrt(var_j x[b, j] + eps) + beta``
    (biased variance over the features; Ba, Kiros & Hinton 2016), ``gamma`` /
    ``beta`` from the InitScheme's ``ln_weight`` / ``ln_bias`` (torch: ones and
    zeros); ``affine=False`` has neither."""

    eps: float = 1e-5
    affine: bool = True

    kind = "layernorm"
    type_name = "layernorm"
    prefix = "ln"
    selector_aliases = ("layernorm",)
    slot_table = (
        Slot("weight", "ln_weight", "ones", aliases=("gamma",)),
        Slot("bias", "ln_bias", "zeros", aliases=("beta",)),
    )

    def __post_init__(self) -> None:
        self._check("LayerNorm")

    def describe(self, fan_in: int, width: int) -> str:
        return "LN" if self.affine else "LN(affine=False)"

    # -- analytic rule ------------------------------------------------------------
    def _example_stats(self, state: mfstate.State) -> tuple[np.ndarray, np.ndarray]:
        """Per-example feature mean mu_a and std sigma_a at infinite width: the units
        are exchangeable and independent given the layer below, so the feature
        average of h_a is its expectation, mu_a = ex[a], and the feature variance
        K[a, a] - ex[a]^2 (law of large numbers)."""
        mu = state.ex
        var = np.maximum(np.diag(state.K) - mu * mu, 0.0)
        return mu, np.sqrt(var + self.eps)

    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """At infinite width LayerNorm is a deterministic affine map per example,
        ``n_a = (h_a - mu_a) / sigma_a`` (mu_a, sigma_a: :meth:`_example_stats`), so
        each example is rescaled to unit second moment after centring over the
        features: ``K_LN[a, b] = E[gamma^2] (K[a, b] - mu_a mu_b) / (sigma_a sigma_b)
        + E[beta^2]`` (the cross term vanishes: the centred n has zero mean over
        units), ``ex_LN = mu_beta``; a Gaussian (mixture) input stays one, with the
        gamma / beta nodes as for BatchNorm (docs/theory.md, LayerNorm)."""
        mg, vg, mb, vb = self._laws(ctx)
        mu, sig = self._example_stats(state)
        Kc = (state.K - np.outer(mu, mu)) / np.outer(sig, sig)
        n = Kc.shape[0]
        K = (vg + mg * mg) * Kc + (vb + mb * mb) * np.ones((n, n))
        ex = np.full(n, mb)
        ctx.extra.update(sig=sig, en2=float(np.mean(np.diag(Kc))))
        if state.gauss is None:
            why = (
                f"the input of {ctx.info.name} is not Gaussian ({state.why_not_gauss})"
            )
            return mfstate.State(ex, K, None, why)
        try:
            g = self._mixture(
                ctx,
                [
                    (wk, (mk - mu) / sig, Sk / np.outer(sig, sig))
                    for wk, mk, Sk in zip(
                        state.gauss.w, state.gauss.m, state.gauss.S, strict=True
                    )
                ],
            )
        except NotImplementedError as exc:
            return mfstate.State(ex, K, None, str(exc))
        return mfstate.State(ex, K, g)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``dL/dh_a = (gamma/sigma_a) (I - 11^T/N - n_a n_a^T/N) dL/dy_a``: the
        projection removes two of N directions, so at infinite width
        ``q~_in = E[gamma^2 q~_out | gamma] mean_a sigma_a^-2`` (close to the
        identity over the example's scale).  Not centred over the batch."""
        self._gamma_beta_norms(ctx, grad, ctx.extra["en2"])
        gain = self._gain_numerator(ctx, grad) * float(
            np.mean(ctx.extra["sig"] ** -2.0)
        )
        return mfstate.GradState(np.array([gain]), independent=False)

    # -- empirical step -----------------------------------------------------------
    def _kernels(self, ops: Any):
        return ops.ln, ops.ln_backward

    def fusion(self) -> tuple:
        return ("row_affine", self.eps)

    def _jac(self, saved: Any, t: np.ndarray, rows: slice | int) -> np.ndarray:
        """``J t = gamma invstd (t - mean_j t - xhat mean_j(xhat t))`` per example."""
        x, (mean, invstd), gamma, _ = saved
        x64 = x[rows].astype(np.float64)
        iv = np.atleast_1d(invstd[rows]).astype(np.float64)[:, None]
        xhat = (np.atleast_2d(x64) - np.atleast_1d(mean[rows])[:, None]) * iv
        t64 = t.astype(np.float64)
        tc = t64 - t64.mean(axis=1, keepdims=True)
        proj = tc - xhat * (xhat * t64).mean(axis=1, keepdims=True)
        return gamma.astype(np.float64) * iv * proj

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        if example is None:
            return self._jac(saved, t, slice(None)).astype(t.dtype)
        return self._jac(saved, t, example)

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        """The per-example Jacobian is symmetric after moving gamma to the other
        side: ``J^T g = invstd P (gamma g)`` with P the same projection."""
        x, sv, gamma, beta = saved
        unit = (x, sv, np.ones_like(gamma), beta)
        return self._jac(unit, g * gamma, slice(None)).astype(g.dtype)


register(BatchNorm, "bn", "batch_norm")
register(LayerNorm, "ln", "layer_norm")
