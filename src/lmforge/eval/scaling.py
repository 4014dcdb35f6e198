"""Scaling laws: fit L(N, D) to a sweep's runs, and use the fit (predict a loss, size a model).

Approach 3 (Hoffmann et al. 2022, as replicated by Besiroglu et al. 2024): L(N, D) = E + A/N^α + B/D^β,
fitted in log space as log L = LSE(a - α log N, b - β log D, e) with A = exp(a), B = exp(b), E = exp(e),
minimising the Huber loss (δ = 1e-3) of the residuals with L-BFGS from a grid of starting points,
and the best kept. Confidence intervals: the fit repeated on bootstrap resamples of the runs.

Approach 2: for each compute budget, a parabola in log N through its runs' losses (an IsoFLOP
curve); its minimum is that budget's best size, and log N_opt against log C is a line.

Compute-optimal allocation under C = 6 N D (from approach 3): N_opt(C) = G (C/6)^(β/(α+β)) with
G = (α A / (β B))^(1/(α+β)), and D_opt = C / (6 N_opt).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import LMForgeError

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
REFERENCES = {"Chinchilla (Hoffmann et al. 2022)": {"alpha": 0.34, "beta": 0.28, "E": 1.69},
              "Besiroglu et al. 2024": {"alpha": 0.35, "beta": 0.37, "E": 1.82}}
INIT_GRID = {"alpha": (0.2, 0.5, 1.0), "beta": (0.2, 0.5, 1.0), "e": (-1.0, 0.0, 1.0), "a": (0.0, 5.0, 10.0, 15.0),
             "b": (0.0, 5.0, 10.0, 15.0)}
TOP_STARTS = 32
EXPONENT_MIN = 1e-3
RUN_KEYS = ("name", "params", "tokens", "flops", "planned_flops", "val_loss", "val_bpb")


def read_sweep(sweep: str | Path) -> tuple[list[dict], list[dict]]:
    """(finished runs, failed runs) of a sweep directory's results."""
    results = Path(sweep) / "results"
    if not results.is_dir():
        raise LMForgeError(f"{sweep} is not a sweep directory (no results/; run `lmforge scaling sweep` first)")
    done, failed = [], []
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        (failed if "error" in r or r.get("val_loss") is None else done).append(r)
    return done, failed


def _objective(x: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss of log-space residuals and its gradient in x = (a, b, e, α, β)."""
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    top = terms.max(0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(0))
    w /= w.sum(0)
    r = lse - logl
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(), -(dr * w[0] * logn).sum(),
                     -(dr * w[1] * logd).sum()])
    return float(loss), grad


def _minimise(x0: np.ndarray, logn, logd, logl) -> tuple[float, np.ndarray]:
    from scipy.optimize import minimize

    # the exponents stay positive: a law in which loss grows with N or D has no optimum to report
    res = minimize(_objective, x0, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                   bounds=[(None, None)] * 3 + [(EXPONENT_MIN, 5.0)] * 2,
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
    return float(res.fun), res.x


def fit_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: list[np.ndarray] | None = None) -> dict:
    """Approach 3 on points (N, D, L): {E, A, B, alpha, beta, objective}."""
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    if starts is None:
        g = INIT_GRID
        starts = [np.array([a, b, e, al, be]) for al, be, e, a, b in
                  itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])]
        # L-BFGS from the grid's most promising points (by their objective), which is where the full
        # grid's best fits start from in practice, at a fraction of the cost
        starts = sorted(starts, key=lambda x0: _objective(x0, logn, logd, logl)[0])[:TOP_STARTS]
    best = min((_minimise(x0, logn, logd, logl) for x0 in starts), key=lambda t: t[0])
    a, b, e, alpha, beta = best[1]
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "objective": best[0]}


def law_loss(p: dict, n, d):
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def compute_optimal(p: dict, flops) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) for budgets C under C = 6 N D."""
    al, be = p["alpha"], p["beta"]
    g = (al * p["A"] / (be * p["B"])) ** (1 / (al + be))
    n_opt = g * np.power(np.asarray(flops, dtype=float) / 6, be / (al + be))
    return n_opt, np.asarray(flops, dtype=float) / (6 * n_opt)


def bootstrap(n, d, loss, point: dict, samples: int, seed: int = 0) -> dict:
    """5th and 95th percentiles of each parameter over fits to resampled runs (started from the full fit)."""
    rng = np.random.default_rng(seed)
    x0 = np.array([np.log(point["A"]), np.log(point["B"]), np.log(point["E"]), point["alpha"], point["beta"]])
    fits = []
    # a hundred refits take minutes: a bar on stderr (every 30 s in a log file) instead of silence
    for _ in tqdm(range(samples), desc="bootstrap refits", file=sys.stderr, leave=False, disable=samples < 10,
                  mininterval=0.5 if sys.stderr.isatty() else 30):
        idx = rng.integers(0, len(n), len(n))
        if len(set(n[idx])) < 2 or len(set(d[idx])) < 2:
            continue
        fits.append(fit_law(n[idx], d[idx], loss[idx], starts=[x0]))
    if not fits:
        return {}
    ci = {k: [float(np.percentile([f[k] for f in fits], 5)), float(np.percentile([f[k] for f in fits], 95))]
          for k in PARAMS}
    a = [f["beta"] / (f["alpha"] + f["beta"]) for f in fits]
    ci["n_opt_exponent"] = [float(np.percentile(a, 5)), float(np.percentile(a, 95))]
    return ci


def isoflop_minima(runs: list[dict]) -> list[dict]:
    """Approach 2: per planned budget with 3+ sizes, the parabola in log N and its minimum."""
    by_budget: dict[float, list[dict]] = {}
    for r in runs:
        by_budget.setdefault(r.get("planned_flops", r["flops"]), []).append(r)
    minima = []
    for c, group in sorted(by_budget.items()):
        if len({r["params"] for r in group}) < 3:
            continue
        x = np.log([r["params"] for r in group])
        coef = np.polyfit(x, [r["val_loss"] for r in group], 2)
        if coef[0] <= 0:
            minima.append({"flops": c, "coef": coef.tolist(), "n_opt": None, "note": "no minimum (curve opens down)"})
            continue
        x_min = -coef[1] / (2 * coef[0])
        inside = x.min() <= x_min <= x.max()
        minima.append({"flops": c, "coef": coef.tolist(), "n_opt": float(np.exp(x_min)),
                       "loss": float(np.polyval(coef, x_min)), "inside": bool(inside)})
    return minima


def approach2(runs: list[dict]) -> dict:
    minima = isoflop_minima(runs)
    usable = [m for m in minima if m["n_opt"]]
    out: dict = {"minima": minima}
    if len(usable) >= 2:
        slope, icpt = np.polyfit(np.log([m["flops"] for m in usable]), np.log([m["n_opt"] for m in usable]), 1)
        out.update({"n_opt_exponent": float(slope), "d_opt_exponent": float(1 - slope),
                    "n_opt_coefficient": float(np.exp(icpt))})
    return out


def fit_sweep(runs: list[dict], bootstrap_samples: int = 100) -> dict:
    """Both approaches and the compute-optimal rule, from a sweep's finished runs."""
    if len(runs) < len(PARAMS):
        raise LMForgeError(f"the fit has {len(PARAMS)} parameters (E, A, B, alpha, beta) and needs at least "
                           f"{len(PARAMS)} finished runs; found {len(runs)}")
    n = np.array([r["params"] for r in runs], dtype=float)
    d = np.array([r["tokens"] for r in runs], dtype=float)
    loss = np.array([r["val_loss"] for r in runs], dtype=float)
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise LMForgeError("the fit needs runs of at least two sizes and two token counts")
    p = fit_law(n, d, loss)
    pred = law_loss(p, n, d)
    s = p["alpha"] + p["beta"]
    rule = {"n_opt_exponent": p["beta"] / s, "d_opt_exponent": p["alpha"] / s,
            "G": (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)}
    budgets = sorted({r.get("planned_flops", r["flops"]) for r in runs})
    n_opt, d_opt = compute_optimal(p, budgets)
    rule["at"] = [{"flops": c, "n_opt": float(no), "d_opt": float(do), "tokens_per_param": float(do / no),
                   "loss": float(law_loss(p, no, do))} for c, no, do in zip(budgets, n_opt, d_opt)]
    return {"points": len(runs), "approach3": {**p, "ci90": bootstrap(n, d, loss, p, bootstrap_samples),
                                               "rmse_log": float(np.sqrt(np.mean((np.log(pred) - np.log(loss)) ** 2)))},
            "approach2": approach2(runs), "compute_optimal": rule, "references": REFERENCES,
            "runs": [{k: r.get(k) for k in RUN_KEYS} for r in runs]}


def comparison(fit: dict) -> list[str]:
    """Lines comparing the fitted exponents with the published ones."""
    p = fit["approach3"]
    ci = p.get("ci90", {})

    def show(k: str) -> str:
        lo_hi = f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""
        return f"{p[k]:.3g}{lo_hi}"

    lines = [f"approach 3 on {fit['points']} runs: L(N, D) = {show('E')} + {show('A')} / N^{show('alpha')} + "
             f"{show('B')} / D^{show('beta')}   (90% bootstrap intervals; rmse of log L {p['rmse_log']:.4f})"]
    for name, ref in REFERENCES.items():
        lines.append(f"  vs {name}: alpha {ref['alpha']}, beta {ref['beta']}, E {ref['E']} (E depends on the "
                     "tokenizer and data; compare the exponents)")
    rule = fit["compute_optimal"]
    lines.append(f"compute-optimal: N_opt = {rule['G']:.3g} * (C/6)^{rule['n_opt_exponent']:.3f}, D_opt = C / (6 N_opt)"
                 f"  (Chinchilla: exponent ~0.5, ~20 tokens per parameter)")
    for row in rule["at"]:
        lines.append(f"  C = {row['flops']:.3g}: N_opt {row['n_opt']:,.0f}, D_opt {row['d_opt']:,.0f} "
                     f"({row['tokens_per_param']:.1f} tokens/parameter), predicted loss {row['loss']:.4f}")
    a2 = fit["approach2"]
    if "n_opt_exponent" in a2:
        lines.append(f"approach 2 (IsoFLOP parabolas): N_opt ~ C^{a2['n_opt_exponent']:.3f}, D_opt ~ "
                     f"C^{a2['d_opt_exponent']:.3f}")
    for m in a2["minima"]:
        where = m.get("note") or f"N_opt {m['n_opt']:,.0f}" + ("" if m["inside"] else " (outside the sizes run)")
        lines.append(f"  C = {m['flops']:.3g}: {where}")
    bracketed = any(m.get("inside") for m in a2["minima"])
    if p["E"] < 1e-3 or max(p["alpha"], p["beta"]) > 2 or not bracketed:
        lines.append("warning: the sweep does not bracket the optimum (no IsoFLOP minimum inside the sizes run, or an "
                     "exponent or E at an extreme): the law is not reliable for sizing; add smaller sizes or bigger "
                     "budgets")
    return lines


def predict(fit: dict, n: float | None = None, d: float | None = None, flops: float | None = None) -> dict:
    """The fitted law's loss at (N, D); with a budget C, also the compute-optimal N and D (and, given
    only one of N or D, the other from C = 6 N D)."""
    p = fit["approach3"]
    out: dict = {}
    if flops is not None:
        n_opt, d_opt = (float(v[0]) for v in compute_optimal(p, [flops]))
        out.update({"flops": flops, "n_opt": n_opt, "d_opt": d_opt, "tokens_per_param": d_opt / n_opt,
                    "loss_at_optimum": float(law_loss(p, n_opt, d_opt))})
        if n is not None and d is None:
            d = flops / (6 * n)
        elif d is not None and n is None:
            n = flops / (6 * d)
    if n is not None and d is not None:
        out.update({"n": n, "d": d, "loss": float(law_loss(p, n, d))})
    if not out:
        raise LMForgeError("give --n and --d (a loss), or --flops (the optimal size; with --n or --d, the loss)")
    return out
