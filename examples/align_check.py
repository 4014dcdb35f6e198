"""How often a model follows the Align walkthrough's rule: the share of its greedy answers to
held-out prompts that end with "!" (or, for `--task shape` data, that answer "pointed"; see
make_align_data.py, which leaves task.txt beside the prompts).

    python examples/align_check.py MODEL_DIR data/align/eval_prompts.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from make_align_data import follows

from lmforge import load
from lmforge.data.preferences import read_prompts
from lmforge.text.templates import template_from_json
from lmforge.training.tasks.instruct import respond


def follows_rule(model_dir: str, prompts: str, max_new_tokens: int = 40, task: str | None = None) -> dict:
    """Rule-following of the greedy answers; `task` defaults to the one named in task.txt beside `prompts`."""
    marker = Path(prompts).with_name("task.txt")
    task = task or (marker.read_text().strip() if marker.exists() else "exclaim")
    lm = load(model_dir, device="cpu")
    template = template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
    convs = read_prompts(prompts)
    answers = [respond(lm.model, lm.tokenizer, template, c + [{"role": "assistant", "content": ""}], max_new_tokens)
               for c in convs]
    hits = sum(follows(a, task) for a in answers)
    return {"model": model_dir, "follows_rule": round(hits / len(answers), 3), "answers": len(answers),
            "example": answers[0]}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(follows_rule(sys.argv[1], sys.argv[2])))
