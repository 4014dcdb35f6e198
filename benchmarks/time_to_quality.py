"""Time to quality: today's defaults against the new ones, at fixed wall-clock budgets.

Both arms pretrain on the same corpus (default: the built-in `pydocs`), with the same tokenizer
(trained once, cached) and the same validation split, at the same model shape (the one
`--size auto` picks for each budget in the old arm), and report the final validation bits per
byte. Runs are interleaved (old, new, old, new, ...) so that load on a shared machine hits both.

First, unless --ablate-minutes 0: which changes earn their place. On the old defaults' shape at
the shortest budget it runs AdamW, Muon at a few learning rates, then each architecture option on
top of the better optimizer; an option joins the new defaults only if it lowers val bpb by more
than --margin. Then the comparison at every budget, and the time the new defaults need to reach
the old defaults' figure at the longest budget (the smallest budget whose final figure does, and
the earliest evaluation inside any new run that does).

On a machine shared with other work, wall-clock runs get unequal shares of the CPU; the ablation
can instead give every run the same number of steps (--ablate-steps N, at the shape --n-layer /
--n-embd; with no --budgets it stops there): the options cost about the same per step, so equal
steps are a fair stand-in for equal time there, and immune to the noise.

Or, with --against-nanogpt, against nanoGPT's CPU recipe (its README's command for a laptop:
train_shakespeare_char.py with --device=cpu --compile=False --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0), set up
in lmforge's trainer as nanoGPT's train.py would configure it (AdamW lr 1e-3, betas 0.9/0.99,
weight decay 0.1, 100 warmup steps, cosine to 1e-4, clip 1.0) on the same corpus and tokenizer:
its final val bpb is the target, and lmforge's defaults get fractions of its wall time
(--fractions); reported: the smallest fraction whose run reaches the target.

    python benchmarks/time_to_quality.py [--budgets 1 2 4] [--ablate-minutes 1] [--out runs/ttq]
    python benchmarks/time_to_quality.py --budgets --ablate-steps 1000 --n-layer 1 --n-embd 64
    python benchmarks/time_to_quality.py --against-nanogpt [--fractions 0.1 0.25 0.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lmforge.core.runtime import cpu_name
from lmforge.training.pretrain import PretrainConfig, pretrain

OLD = {"optimizer": "adamw", "qk_norm": False, "relu2": False, "untied_head": False, "logit_softcap": None}
OPTIONS = {"qk_norm": {"qk_norm": True}, "relu2": {"relu2": True}, "untied_head": {"untied_head": True},
           "logit_softcap": {"logit_softcap": 15.0}}
MUON_LRS = (0.01, 0.02, 0.04)
# nanoGPT's CPU recipe. lmforge's GPT-2 layout keeps its biases (nanoGPT's train.py turns them off).
NANOGPT = {"optimizer": "adamw", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "warmup_steps": 100,
           "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0, "dropout": 0.0, "n_layer": 4, "n_head": 4,
           "n_embd": 128, "context_length": 64, "batch_size": 12, "eval_every": 250}  # its eval_interval
NANOGPT_STEPS = 2000


def against_nanogpt(args) -> dict:
    """nanoGPT's recipe for NANOGPT_STEPS steps, then lmforge's defaults at fractions of its time."""
    ref = run(args, "nanogpt", None, NANOGPT, {}, NANOGPT_STEPS)
    target, seconds = ref["val_bpb"], ref["elapsed_s"]
    rows = [run(args, f"defaults-{f:g}", seconds * f / 60, {}, {}) for f in sorted(args.fractions)]
    reach = next((f for f, r in zip(sorted(args.fractions), rows) if r["val_bpb"] <= target), None)
    print(f"nanoGPT's recipe: {target:.4f} bpb in {seconds:.0f} s. lmforge's defaults reach it "
          + (f"in {reach:g} of that time" if reach else "in none of the fractions tried"), flush=True)
    return {"target_bpb": target, "nanogpt_seconds": seconds, "reach_fraction": reach, "runs": [ref, *rows]}


def run(args, name: str, minutes: float | None, arm: dict, shape: dict, steps: int | None = None) -> dict:
    """One pretraining run of `minutes` of training (or `steps` steps); its final val bpb and record."""
    out = Path(args.out) / name
    budget = {"max_steps": steps} if steps else {"max_minutes": minutes}
    settings = {"eval_every": args.eval_every, "eval_batches": args.eval_batches, **shape, **arm}
    cfg = PretrainConfig(data=args.data, out=str(out), overwrite=True, **budget, device="cpu", save_every=0,
                         seed=args.seed, vocab_size=args.vocab_size, **settings)
    record = pretrain(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = json.loads((out / "config.json").read_text())["model"]
    evals = [(r["elapsed_s"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    result = {"name": name, "minutes": minutes, "max_steps": steps, "arm": arm, "val_bpb": evals[-1][1],
              "evals": evals,
              "steps": record["step"], "tokens": record["tokens"], "elapsed_s": round(record["elapsed"], 1),
              "tokens_per_sec": round(record["tokens"] / max(record["elapsed"], 1e-9), 1),
              "shape": {"n_layer": model["n_layer"], "n_embd": model["n_embd"], "n_head": model["n_head"]}}
    given = f"{steps} steps" if steps else f"{minutes:g} min"
    print(f"  {name:<28} {given:>9}  val_bpb {result['val_bpb']:.4f}  {result['steps']:>5} steps  "
          f"{result['tokens_per_sec']:>8,.0f} tok/s  ({model['n_layer']}x{model['n_embd']})", flush=True)
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def ablate(args, shape: dict, baseline: dict, results: list) -> dict:
    """The new defaults: the better optimizer, then each option that helps on top of it."""
    minutes, steps = args.ablate_minutes, args.ablate_steps
    if steps:  # a step-matched baseline
        baseline = run(args, "ablate-adamw", None, OLD, shape, steps)
        results.append(baseline)
    best, best_bpb = dict(OLD), baseline["val_bpb"]
    for lr in MUON_LRS:
        r = run(args, f"ablate-muon-lr{lr:g}", minutes, {**OLD, "optimizer": "muon", "muon_lr": lr}, shape, steps)
        results.append(r)
        if r["val_bpb"] < best_bpb - args.margin:
            best, best_bpb = r["arm"], r["val_bpb"]
    chosen = dict(best)
    for name, option in OPTIONS.items():
        r = run(args, f"ablate-{name}", minutes, {**best, **option}, shape, steps)
        results.append(r)
        r["gain"] = round(best_bpb - r["val_bpb"], 4)
        if r["gain"] > args.margin:
            chosen.update(option)
    print(f"new defaults: {json.dumps(chosen)}", flush=True)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["pydocs"])
    ap.add_argument("--budgets", type=float, nargs="*", default=[1, 2, 4], help="wall-clock minutes of training")
    ap.add_argument("--ablate-minutes", type=float, default=1.0, help="budget of each ablation run (0: skip, "
                    "and compare against --new)")
    ap.add_argument("--ablate-steps", type=int, default=None, help="give each ablation run this many steps "
                    "instead of --ablate-minutes (needs --n-layer and --n-embd)")
    ap.add_argument("--new", default=None, help="JSON of the new defaults' settings, when not ablating")
    ap.add_argument("--margin", type=float, default=0.005, help="val bpb an option must gain to be kept")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--n-layer", type=int, default=None, help="fix the shape (default: --size auto per budget)")
    ap.add_argument("--n-embd", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default="runs/ttq")
    ap.add_argument("--keep-runs", action="store_true")
    ap.add_argument("--against-nanogpt", action="store_true", help="compare the defaults with nanoGPT's CPU recipe")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                    help="--against-nanogpt: shares of nanoGPT's wall time given to the defaults")
    args = ap.parse_args()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; data {args.data}",
          flush=True)
    if args.against_nanogpt:
        summary = against_nanogpt(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "nanogpt.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
        return
    fixed = {"n_layer": args.n_layer, "n_embd": args.n_embd} if args.n_layer and args.n_embd else None
    results: list[dict] = []
    budgets = sorted(args.budgets)
    new = json.loads(args.new) if args.new else None
    if args.ablate_steps:
        if not fixed:
            ap.error("--ablate-steps needs --n-layer and --n-embd")
        new = ablate(args, fixed, {}, results)
        if not budgets:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "ablation.json").write_text(json.dumps({"new_defaults": new, "runs": results}, indent=1))
            return
    rows = []
    for minutes in budgets:
        old = run(args, f"old-{minutes:g}min", minutes, OLD, fixed or {})
        results.append(old)
        shape = fixed or {"n_layer": old["shape"]["n_layer"], "n_embd": old["shape"]["n_embd"]}
        if new is None:
            new = ablate(args, shape, old, results) if args.ablate_minutes > 0 else dict(OLD)
        fresh = run(args, f"new-{minutes:g}min", minutes, new, shape)
        results.append(fresh)
        rows.append((minutes, old, fresh))
    target = rows[-1][1]["val_bpb"]
    reach_budget = next((m for m, _, fresh in rows if fresh["val_bpb"] <= target), None)
    reach_inside = min((t for _, _, fresh in rows for t, bpb in fresh["evals"] if bpb <= target), default=None)
    print("\nbudget   old val_bpb  new val_bpb   old steps  new steps   old tok/s  new tok/s")
    for minutes, old, fresh in rows:
        print(f"{minutes:>4g} min  {old['val_bpb']:>10.4f}  {fresh['val_bpb']:>10.4f}   {old['steps']:>9}  "
              f"{fresh['steps']:>9}   {old['tokens_per_sec']:>9,.0f}  {fresh['tokens_per_sec']:>9,.0f}")
    last = budgets[-1]
    print(f"old defaults at {last:g} min: {target:.4f} bpb. New defaults reach it "
          + (f"within the {reach_budget:g}-minute budget ({last / reach_budget:.1f}x time-to-quality)"
             if reach_budget else "in no budget")
          + (f"; inside a run, first at {reach_inside:.0f} s" if reach_inside is not None else ""))
    summary = {"new_defaults": new, "target_bpb": target, "reach_budget_min": reach_budget,
               "reach_inside_s": reach_inside, "runs": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
