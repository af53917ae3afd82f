"""Power-law learning curves (papers/scaling_laws.md, Hestness et al. 2017): fits with confidence intervals, local
slopes, the power-law region, the best-model-size curve and holdout extrapolation.

Model: eps(m) = alpha * m^beta (+ gamma), beta < 0 for a learning curve. Fits are done in natural logs:
* ``gamma="none"`` (or a fixed number g): ordinary least squares of log(eps - g) on log m ("ols_log"); covariance
  sigma^2 (X^T W X)^-1 with sigma^2 = RSS / (n - 2), Student-t intervals.
* ``gamma="fit"``: nonlinear least squares of log(e^a m^beta + e^c) - log eps over (a, beta, c) by our own
  Levenberg-Marquardt ("nls_log"; alpha = e^a, gamma = e^c > 0 by construction), started from several floors;
  covariance sigma^2 (J^T J)^-1.
* ``bootstrap=B`` refits B resampled data sets: points with replacement (``boot_unit="point"``) or, when several
  seeds share an m, one seed's value per m (``"seed"``, preferred). Percentile intervals then replace the
  delta-method ones (use them for anything extrapolated more than a few x beyond the fitted range).

``curve_fit_reference`` fits the same points with ``scipy.optimize.curve_fit`` (the anchor): on the same log
objective, and on the raw values as curve_fit is usually called.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """eps(m) = alpha m^beta + gamma fitted to (m, eps) over [x_min, x_max].

    Attributes:
      alpha, beta, gamma: the estimate (gamma = 0 when not fitted, the given value when fixed).
      cov: covariance of (log alpha, beta[, log gamma]) from the fit (delta method).
      x_min, x_max, n, dof, rss: fitted range, points, residual degrees of freedom, residual sum of squares (logs).
      method: "ols_log" | "nls_log"; gamma_mode: "none" | "fixed" | "fit".
      boot: (B, 3) bootstrap draws of (alpha, beta, gamma), or None.
    """
    alpha: float
    beta: float
    gamma: float
    cov: np.ndarray
    x_min: float
    x_max: float
    n: int
    dof: int
    rss: float
    method: str
    gamma_mode: str
    boot: np.ndarray | None = None
    boot_requested: int = 0

    def __call__(self, m) -> np.ndarray:
        return self.alpha * np.asarray(m, np.float64) ** self.beta + self.gamma

    def ci(self, level: float = 0.9) -> dict[str, tuple[float, float]]:
        """Two-sided ``level`` intervals of alpha, beta (and gamma when fitted): bootstrap percentiles when
        there are draws, else delta-method Student-t intervals (alpha, gamma through their logs)."""
        names = ["alpha", "beta"] + (["gamma"] if self.gamma_mode == "fit" else [])
        if self.boot is not None and len(self.boot):
            q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
            return {k: tuple(float(v) for v in np.percentile(self.boot[:, i], q)) for i, k in enumerate(names)}
        t = _t_quantile((1 + level) / 2, max(self.dof, 1))
        sd = np.sqrt(np.maximum(np.diag(self.cov), 0.0))
        out = {"alpha": (self.alpha * math.exp(-t * sd[0]), self.alpha * math.exp(t * sd[0])),
               "beta": (self.beta - t * sd[1], self.beta + t * sd[1])}
        if self.gamma_mode == "fit":
            out["gamma"] = (self.gamma * math.exp(-t * sd[2]), self.gamma * math.exp(t * sd[2]))
        return out

    def summary(self, level: float = 0.9) -> dict[str, Any]:
        ci = self.ci(level)
        out = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "method": self.method,
               "gamma_mode": self.gamma_mode, "x_min": self.x_min, "x_max": self.x_max, "n": self.n,
               "rss": self.rss, "ci_level": level, "ci_from": "bootstrap" if self.boot is not None else "delta"}
        out.update({f"{k}_ci": list(v) for k, v in ci.items()})
        if self.boot is not None:
            out["bootstrap"] = int(len(self.boot))
        if self.gamma_mode == "fit":
            out["gamma_identified"] = self.gamma_identified(level)
        return out

    def gamma_identified(self, level: float = 0.9) -> bool:
        """Whether the fitted floor is identified: its interval excludes ~0 (lower end above gamma / 10) and, with
        a bootstrap, at least half of the refits succeeded. When not, report the fit without gamma instead."""
        if self.gamma_mode != "fit":
            return False
        if self.boot is not None and len(self.boot) < 0.5 * max(self.boot_requested, 1):
            return False
        lo, hi = self.ci(level)["gamma"]
        return bool(lo > 0.1 * self.gamma and hi > lo)

    def formula(self) -> str:
        g = f" + {self.gamma:.3g}" if self.gamma_mode != "none" else ""
        return f"eps(m) = {self.alpha:.3g} m^{self.beta:.3f}{g}"


def _t_quantile(p: float, dof: int) -> float:
    from scipy.special import stdtrit      # Student-t quantile (scipy.stats is slow to import)
    return float(stdtrit(dof, p))


def _as_arrays(m, err, weights=None):
    m = np.asarray(m, np.float64).ravel()
    e = np.asarray(err, np.float64).ravel()
    if m.shape != e.shape:
        raise ValueError(f"m and err must have the same length, got {m.size} and {e.size}")
    if m.size < 3:
        raise ValueError(f"a power-law fit needs at least 3 points, got {m.size}")
    if np.any(m <= 0) or np.any(~np.isfinite(m)):
        raise ValueError("m must be positive and finite")
    if np.any(~np.isfinite(e)) or np.any(e <= 0):
        raise ValueError("err must be positive and finite (the fit is in log space)")
    w = np.ones_like(m) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != m.shape or np.any(w < 0):
        raise ValueError("weights must be non-negative, one per point")
    return m, e, w


def _ols(x, y, w):
    """Weighted least squares y = c0 + c1 x -> (coef [2], cov [2, 2], rss)."""
    X = np.stack([np.ones_like(x), x], 1)
    XtW = X.T * w
    A = XtW @ X
    coef = np.linalg.solve(A, XtW @ y)
    r = y - X @ coef
    rss = float(np.sum(w * r * r))
    dof = max(len(x) - 2, 1)
    return coef, np.linalg.inv(A) * rss / dof, rss


def _nls(lm, ly, w, p0, iters: int = 200):
    """Levenberg-Marquardt for r(p) = sqrt(w) (log(e^a m^b + e^c) - log y), p = (a, b, c)."""
    sw = np.sqrt(w)

    def resid_jac(p):
        a, b, c = p
        lu = a + b * lm                      # log of the power-law term
        top = np.maximum(lu, c)
        s = top + np.log(np.exp(lu - top) + np.exp(c - top))   # log(e^lu + e^c), stable
        fu, fc = np.exp(lu - s), np.exp(c - s)
        r = sw * (s - ly)
        J = sw[:, None] * np.stack([fu, fu * lm, fc], 1)
        return r, J

    p = np.asarray(p0, np.float64)
    r, J = resid_jac(p)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(iters):
        A = J.T @ J
        g = J.T @ r
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
        p_new = p + step
        r_new, J_new = resid_jac(p_new)
        cost_new = float(r_new @ r_new)
        if cost_new < cost:
            done = cost - cost_new <= 1e-12 * max(cost, 1e-300) or np.max(np.abs(step)) < 1e-9
            p, r, J, cost = p_new, r_new, J_new, cost_new
            lam = max(lam / 3, 1e-12)
            if done:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    return p, J, cost


def _fit_once(m, e, w, gamma, start=None) -> tuple[np.ndarray, np.ndarray, float, str, str]:
    """-> ((alpha, beta, gamma), cov, rss, method, gamma_mode). ``start``: (alpha, beta, gamma) tried first
    (the bootstrap starts from the full fit)."""
    lm = np.log(m)
    if gamma == "none" or gamma is None:
        coef, cov, rss = _ols(lm, np.log(e), w)
        return np.array([math.exp(coef[0]), coef[1], 0.0]), cov, rss, "ols_log", "none"
    if gamma == "fit":
        ly = np.log(e)
        coef, _, _ = _ols(lm, ly, w)
        starts = []
        if start is not None:
            starts.append([math.log(start[0]), start[1], math.log(max(start[2], 1e-300))])
        for frac in ((0.5,) if start is not None else (0.5, 0.9, 0.1)):   # several floors: local minima
            g0 = frac * e.min()
            coef0, _, _ = _ols(lm, np.log(np.maximum(e - g0, 1e-12 * e.min())), w)
            starts.append([coef0[0], coef0[1], math.log(g0)])
        best = None
        for p0 in starts:
            p, J, cost = _nls(lm, ly, w, p0)
            if best is None or cost < best[2]:
                best = (p, J, cost)
        p, J, cost = best
        dof = max(len(m) - 3, 1)
        try:
            cov = np.linalg.inv(J.T @ J) * cost / dof
        except np.linalg.LinAlgError:
            cov = np.full((3, 3), np.inf)
        return np.array([math.exp(p[0]), p[1], math.exp(p[2])]), cov, cost, "nls_log", "fit"
    g = float(gamma)
    if np.any(e <= g):
        raise ValueError(f"fixed gamma {g} is not below every err (min {e.min()})")
    coef, cov, rss = _ols(lm, np.log(e - g), w)
    return np.array([math.exp(coef[0]), coef[1], g]), cov, rss, "ols_log", "fixed"


def fit_power_law(m, err, *, gamma: str | float | None = "none", weights=None, bootstrap: int = 0,
                  boot_unit: str = "point", seed: int = 0) -> PowerLawFit:
    """Fits eps(m) = alpha m^beta (+ gamma); see the module docstring.

    Args:
      m, err: data sizes and errors (> 0). Repeated m values are seeds of one shard.
      gamma: "none" (no floor), "fit" (fitted floor), or a fixed floor value.
      weights: per-point weights of the log residuals.
      bootstrap: number of bootstrap refits (0 = delta-method intervals only).
      boot_unit: "point" (resample points) or "seed" (one seed's value per distinct m).

    Raises:
      ValueError: fewer than 3 points (4 with a fitted gamma), non-positive values, bad options.
    """
    m, e, w = _as_arrays(m, err, weights)
    if gamma == "fit" and m.size < 4:
        raise ValueError(f"fitting gamma needs at least 4 points, got {m.size}")
    if boot_unit not in ("point", "seed"):
        raise ValueError(f"boot_unit must be 'point' or 'seed', got {boot_unit!r}")
    params, cov, rss, method, gmode = _fit_once(m, e, w, gamma)
    boot = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        uniq = np.unique(m)
        need = 4 if gamma == "fit" else 3
        for _ in range(int(bootstrap)):
            if boot_unit == "seed":
                idx = np.array([rng.choice(np.flatnonzero(m == u)) for u in uniq])
            else:
                idx = rng.integers(0, m.size, m.size)
                if np.unique(m[idx]).size < need:
                    continue
            try:
                p, _, _, _, _ = _fit_once(m[idx], e[idx], w[idx], gamma, start=params)
            except (ValueError, np.linalg.LinAlgError):
                continue
            draws.append(p)
        boot = np.asarray(draws)
    return PowerLawFit(float(params[0]), float(params[1]), float(params[2]), np.asarray(cov), float(m.min()),
                       float(m.max()), int(m.size), int(max(m.size - (3 if gmode == "fit" else 2), 1)), float(rss),
                       method, gmode, boot, int(bootstrap))


def predict(fit: PowerLawFit, m_new, *, level: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, lo, hi) of the mean curve at ``m_new``: bootstrap percentiles of the refitted curves when
    the fit has draws, else the delta method on log(eps - gamma) (gamma treated as known)."""
    x = np.atleast_1d(np.asarray(m_new, np.float64))
    mean = fit(x)
    if fit.boot is not None and len(fit.boot):
        curves = fit.boot[:, 0:1] * x[None] ** fit.boot[:, 1:2] + fit.boot[:, 2:3]
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        lo, hi = np.percentile(curves, q, axis=0)
        return mean, lo, hi
    t = _t_quantile((1 + level) / 2, max(fit.dof, 1))
    X = np.stack([np.ones_like(x), np.log(x)], 1)
    sd = np.sqrt(np.einsum("ij,jk,ik->i", X, fit.cov[:2, :2], X))
    core = fit.alpha * x ** fit.beta
    return mean, core * np.exp(-t * sd) + fit.gamma, core * np.exp(t * sd) + fit.gamma


def data_needed(fit: PowerLawFit, target: float) -> float:
    """m* with eps(m*) = target (inf when target <= gamma)."""
    if target <= fit.gamma:
        return float("inf")
    return float(((target - fit.gamma) / fit.alpha) ** (1.0 / fit.beta))


def local_slopes(m, err) -> np.ndarray:
    """d log err / d log m between neighbouring points (sorted by m): [n - 1]."""
    m = np.asarray(m, np.float64)
    e = np.asarray(err, np.float64)
    o = np.argsort(m)
    return np.diff(np.log(e[o])) / np.diff(np.log(m[o]))


def find_power_law_region(m, err, *, best_guess: float | None = None, min_points: int = 4,
                          tol: float = 0.1, guess_margin: float = 0.05) -> tuple[int, int]:
    """[i0, i1) of the (sorted) points that form the power-law region.

    Leading points within ``guess_margin`` of the best-guess error are the small-data region. Among the remaining
    contiguous windows of at least ``min_points`` points, the longest one whose log-log curvature is small is
    kept: a quadratic fit's bend over the window, |c2| (range of log m)^2 / 4, below ``tol`` (in log error, ~tol
    relative). Ties go to the steepest window. Returns the whole remaining range if no window qualifies.
    """
    m = np.asarray(m, np.float64)
    e = np.asarray(err, np.float64)
    if np.any(np.diff(m) <= 0):
        raise ValueError("m must be sorted and distinct (average seeds first)")
    start = 0
    if best_guess is not None:
        while start < len(m) and e[start] >= (1 - guess_margin) * best_guess:
            start += 1
    lm, le = np.log(m), np.log(e)
    best, best_key = (start, len(m)), None
    for i in range(start, len(m)):
        for j in range(i + min_points, len(m) + 1):
            x, y = lm[i:j], le[i:j]
            c2, c1, _ = np.polyfit(x - x.mean(), y, 2)
            bend = abs(c2) * (x[-1] - x[0]) ** 2 / 4
            if bend <= tol:
                slope = np.polyfit(x, y, 1)[0]
                key = (j - i, -slope)
                if best_key is None or key > best_key:
                    best, best_key = (i, j), key
    return best


def holdout_check(m, err, *, n_holdout: int = 2, level: float = 0.9, **fit_kw) -> dict[str, Any]:
    """Fits on all but the ``n_holdout`` largest distinct m, predicts those, and reports the relative errors."""
    m = np.asarray(m, np.float64)
    e = np.asarray(err, np.float64)
    uniq = np.unique(m)
    if uniq.size < n_holdout + 3:
        raise ValueError(f"holdout of {n_holdout} needs at least {n_holdout + 3} distinct m, got {uniq.size}")
    cut = uniq[-n_holdout]
    fit = fit_power_law(m[m < cut], e[m < cut], **fit_kw)
    held = uniq[-n_holdout:]
    true = np.array([e[m == u].mean() for u in held])
    pred, lo, hi = predict(fit, held, level=level)
    rel = np.abs(pred - true) / true
    return {"fit": fit.summary(level), "held_m": held.tolist(), "true": true.tolist(), "pred": pred.tolist(),
            "lo": lo.tolist(), "hi": hi.tolist(), "rel_err": rel.tolist(),
            "inside_ci": [bool(a <= t <= b) for a, t, b in zip(lo, true, hi)],
            "extrapolation": (held / fit.x_max).tolist()}


def fit_model_size(m, s_best, **kw) -> PowerLawFit:
    """s(m) = alpha_p m^beta_p of the best model's parameter count per shard (no floor)."""
    return fit_power_law(m, s_best, gamma="none", **kw)


def best_per_shard(records: Iterable[Mapping[str, Any]], *, metric: str = "value", size_key: str = "m",
                   hparam_keys: Sequence[str] = ("width", "lr"), params_key: str = "n_params"
                   ) -> dict[str, np.ndarray]:
    """Best-per-shard learning curve: per (m, hparams) the mean over seeds, then the min over hparams (seeds are
    averaged first, against selection bias; scaling_laws.md pitfalls).

    Returns:
      {"m", "err" (best mean), "err_sd" (its seeds' sd), "n_seeds", "best_params" (params_key of the best), and
      each hparam key's best value}.
    """
    groups: dict[tuple, list] = {}
    for r in records:
        key = (float(r[size_key]),) + tuple(r[k] for k in hparam_keys)
        groups.setdefault(key, []).append(r)
    by_m: dict[float, list] = {}
    for key, rs in groups.items():
        vals = np.array([float(r[metric]) for r in rs])
        by_m.setdefault(key[0], []).append((vals.mean(), vals.std(ddof=1) if len(vals) > 1 else 0.0, len(vals),
                                            key[1:], rs[0].get(params_key, np.nan)))
    out: dict[str, list] = {"m": [], "err": [], "err_sd": [], "n_seeds": [], "best_params": []}
    out.update({k: [] for k in hparam_keys})
    for mv in sorted(by_m):
        mean, sd, n, hp, npar = min(by_m[mv], key=lambda t: t[0])
        out["m"].append(mv)
        out["err"].append(mean)
        out["err_sd"].append(sd)
        out["n_seeds"].append(n)
        out["best_params"].append(npar)
        for k, v in zip(hparam_keys, hp):
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def curve_fit_reference(m, err, *, gamma: str | float | None = "none") -> dict[str, Any]:
    """The same points fitted by ``scipy.optimize.curve_fit`` (the anchor fitter).

    Returns:
      {"log": {alpha, beta, gamma, sd of each}: curve_fit on log eps with the log model (our objective),
       "linear": {...}: curve_fit on eps itself with alpha m^beta (+ gamma), as it is usually called}.
    """
    from scipy.optimize import curve_fit
    m, e, _ = _as_arrays(m, err)
    lm, ly = np.log(m), np.log(e)
    ours = _fit_once(m, e, np.ones_like(m), gamma)[0]
    out: dict[str, Any] = {}
    if gamma == "fit":
        def flog(x, a, b, c):
            return np.logaddexp(a + b * x, c)
        p0 = [math.log(ours[0]), ours[1], math.log(max(ours[2], 1e-12))]
        p, cov = curve_fit(flog, lm, ly, p0=p0, maxfev=20000)
        sd = np.sqrt(np.maximum(np.diag(cov), 0))
        out["log"] = {"alpha": math.exp(p[0]), "beta": p[1], "gamma": math.exp(p[2]), "sd_log_alpha": sd[0],
                      "sd_beta": sd[1], "sd_log_gamma": sd[2]}

        def flin(x, a, b, c):
            return a * x ** b + c
        p, cov = curve_fit(flin, m, e, p0=[ours[0], ours[1], ours[2]], maxfev=20000)
        sd = np.sqrt(np.maximum(np.diag(cov), 0))
        out["linear"] = {"alpha": p[0], "beta": p[1], "gamma": p[2], "sd_alpha": sd[0], "sd_beta": sd[1],
                         "sd_gamma": sd[2]}
    else:
        g = 0.0 if gamma in ("none", None) else float(gamma)

        def flog(x, a, b):
            return a + b * x
        p, cov = curve_fit(flog, lm, np.log(e - g), p0=[math.log(ours[0]), ours[1]])
        sd = np.sqrt(np.maximum(np.diag(cov), 0))
        out["log"] = {"alpha": math.exp(p[0]), "beta": p[1], "gamma": g, "sd_log_alpha": sd[0], "sd_beta": sd[1]}

        def flin(x, a, b):
            return a * x ** b + g
        p, cov = curve_fit(flin, m, e, p0=[ours[0], ours[1]], maxfev=20000)
        sd = np.sqrt(np.maximum(np.diag(cov), 0))
        out["linear"] = {"alpha": p[0], "beta": p[1], "gamma": g, "sd_alpha": sd[0], "sd_beta": sd[1]}
    return {k: {kk: float(vv) for kk, vv in v.items()} for k, v in out.items()}


def agrees_with(fit: PowerLawFit, ref: Mapping[str, float], level: float = 0.9) -> dict[str, bool]:
    """Whether each of the reference's parameters lies inside ``fit``'s ``level`` interval."""
    return {k: bool(lo <= ref[k] <= hi) for k, (lo, hi) in fit.ci(level).items()}
