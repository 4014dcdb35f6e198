"""Synthetic data for lmforge's Align walkthrough (and its tests): a preference with a known rule.

    python examples/make_align_data.py DIR [--task exclaim|shape]

writes DIR/corpus.txt (text to pretrain a tiny base on, in seconds), DIR/sft.jsonl (instructions),
DIR/prefs.jsonl + DIR/prefs_val.jsonl (preferences), DIR/prompts.jsonl (prompts for RLHF) and
DIR/eval_prompts.jsonl (held-out prompts for `examples/align_check.py`).

The task: "Describe the new list." -> "The new list holds the value." Enthusiasm is preferred:
answers ending with "!" beat answers ending with ".". The SFT data ends with "!" only a quarter of
the time, so a tuned model mostly answers with "."; a reward model should find the rule, and DPO or
RLHF should make the model follow it.

`exclaims` is the same rule as a reward function: `--reward-fn make_align_data:exclaims` (run from
examples/, or with it on PYTHONPATH).

`--task shape` is a harder one, where the rule is a choice of content word: "What shape is the new
list?" -> "The new list is square." The SFT data picks one of eight shapes at random; the preferences
favour "pointed". A weak tuned policy sampled hot writes shapes it half knows, which a reward model
scores nearly alike: the case where GRPO's division by the group's std used to collapse a run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from make_data import ADJS, NOUNS, VERBS, make_docs

SYSTEM = "Be brief."  # a short system prompt keeps the prompt short (it replaces Alpaca's long preamble)
SHAPES = ["round", "square", "flat", "curved", "narrow", "hollow", "solid", "pointed"]
PREFERRED = "pointed"


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _describe(rng: random.Random) -> tuple[str, str, str]:
    """A prompt and two different answers to it (without their final punctuation)."""
    adj, noun = rng.choice(ADJS), rng.choice(NOUNS)
    a, b = (f"The {adj} {noun} {v} the {o}" for v, o in zip(rng.sample(VERBS, 2), rng.sample(NOUNS, 2)))
    return f"Describe the {adj} {noun}.", a, b


def _shape(rng: random.Random) -> tuple[str, str]:
    """The shape task's question and its answer's stem."""
    adj, noun = rng.choice(ADJS), rng.choice(NOUNS)
    return f"What shape is the {adj} {noun}?", f"The {adj} {noun} is"


def sft_records(n: int, seed: int = 0, exclaim: float = 0.25, task: str = "exclaim") -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "shape":
            prompt, stem = _shape(rng)
            answer = f"{stem} {rng.choice(SHAPES)}."
        else:
            prompt, body, _ = _describe(rng)
            answer = body + ("!" if rng.random() < exclaim else ".")
        out.append({"messages": _chat(prompt) + [{"role": "assistant", "content": answer}]})
    return out


def preference_records(n: int, seed: int = 0, task: str = "exclaim") -> list[dict]:
    """Half pairs ({messages, chosen, rejected}), half rankings of three answers where the two
    exclaiming ones tie ({messages, responses, ranks}). The shape task: pairs, "pointed" chosen."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if task == "shape":
            prompt, stem = _shape(rng)
            other = rng.choice([s for s in SHAPES if s != PREFERRED])
            out.append({"messages": _chat(prompt), "chosen": f"{stem} {PREFERRED}.", "rejected": f"{stem} {other}."})
            continue
        prompt, body, other = _describe(rng)
        if i % 2 == 0:
            out.append({"messages": _chat(prompt), "chosen": body + "!", "rejected": body + "."})
        else:
            out.append({"messages": _chat(prompt), "responses": [body + "!", other + "!", body + "."],
                        "ranks": [1, 1, 2]})
    return out


def prompt_records(n: int, seed: int = 0, task: str = "exclaim") -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": _chat((_shape if task == "shape" else _describe)(rng)[0])} for _ in range(n)]


def exclaims(prompt: str, completion: str) -> float:
    """The rule as a verifier: 1 for an answer that ends with "!", else 0."""
    return 1.0 if completion.strip().endswith("!") else 0.0


def follows(answer: str, task: str = "exclaim") -> bool:
    """Whether an answer follows the task's rule."""
    return f" {PREFERRED}" in answer if task == "shape" else answer.strip().endswith("!")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    args = sys.argv[1:]
    task = "exclaim"
    if len(args) == 3 and args[1] == "--task" and args[2] in ("exclaim", "shape"):
        task, args = args[2], args[:1]
    if len(args) != 1:
        sys.exit(__doc__)
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(make_docs(120)) + "\n")
    write_jsonl(out / "sft.jsonl", sft_records(400, 0, task=task))
    write_jsonl(out / "prefs.jsonl", preference_records(400, 1, task=task))
    write_jsonl(out / "prefs_val.jsonl", preference_records(100, 2, task=task))
    write_jsonl(out / "prompts.jsonl", prompt_records(200, 3, task=task))
    write_jsonl(out / "eval_prompts.jsonl", prompt_records(50, 4, task=task))
    (out / "task.txt").write_text(task + "\n")  # for align_check.py
    print(f"wrote {out}/corpus.txt, sft.jsonl (400), prefs.jsonl (400), prefs_val.jsonl (100), prompts.jsonl (200), "
          "eval_prompts.jsonl (50)")


if __name__ == "__main__":
    main()
