"""`lmforge rank`: a person ranks sampled answers at the terminal, and the rankings become
preference records (the format `align reward` and `align dpo` read)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..data.preferences import parse_preference, read_preferences, read_prompts
from ..formats.kinds import require
from ..formats.load import load_model
from ..text.templates import encode_segments, template_from_json, user_text
from .engine import Engine, Request

HELP = "best first, e.g. `2 1 3`; `2 = 1 3` ties 2 and 1; s = skip; q = quit"


def parse_ranking(text: str, k: int) -> list[list[int]] | None:
    """`2 = 1 3` -> [[1, 0], [2]]: groups of tied answers (0-based), best first; None if it is not a
    ranking of all k answers (each exactly once)."""
    groups: list[list[int]] = []
    tie = False
    for word in text.replace("=", " = ").split():
        if word == "=":
            if not groups or tie:
                return None
            tie = True
            continue
        if not word.isdigit() or not 1 <= int(word) <= k:
            return None
        if tie:
            groups[-1].append(int(word) - 1)
        else:
            groups.append([int(word) - 1])
        tie = False
    if tie or sorted(i for g in groups for i in g) != list(range(k)):
        return None
    return groups


def record_for(conv: list[dict], answers: list[str], groups: list[list[int]], meta: dict) -> dict:
    """The preference record of one ranking: answers best first, equal ranks for ties."""
    prompt = {"prompt": conv[0]["content"]} if len(conv) == 1 else {"messages": conv}
    responses = [answers[i] for g in groups for i in g]
    ranks = [place for place, g in enumerate(groups, 1) for _ in g]
    return {**prompt, "responses": responses, "ranks": ranks, "meta": meta}


def append_record(path: Path, record: dict) -> None:
    """One JSON line, flushed to disk before the next prompt (a crash loses at most the current one)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resume_index(path: Path) -> int:
    """The prompt after the last one ranked in the file (0 for a new file)."""
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        return 0
    return 1 + max(int(r.meta.get("prompt_index", -1)) for r in read_preferences(path))


def rank_session(model_dir: str, prompts: str, out: str, k: int, max_new_tokens: int, temperature: float,
                 top_p: float | None, seed: int, device: str) -> int:
    """Run the terminal session; returns how many rankings were written."""
    convs = read_prompts(prompts)
    out_path = Path(out)
    start = resume_index(out_path)
    if start >= len(convs):
        print(f"all {len(convs)} prompts are ranked in {out_path}", file=sys.stderr)
        return 0
    lm = load_model(model_dir, device=device)
    require(lm.meta, model_dir, "rank needs a model that generates", lambda kind: kind.generates)
    template = template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
    engine = Engine(lm.model, slots=k)
    stop = set(template.stop_tokens(lm.tokenizer)) | lm.stop_ids()
    if start:
        print(f"resuming at prompt {start + 1} of {len(convs)}", file=sys.stderr)
    written = 0
    for i in range(start, len(convs)):
        ids, _ = encode_segments(lm.tokenizer, template.render(convs[i], lm.tokenizer, add_generation_prompt=True))
        room = min(max_new_tokens, engine.max_len - len(ids))
        if room < 1:
            print(f"[{i + 1}/{len(convs)}] skipped: the prompt fills the context", file=sys.stderr)
            continue
        first_seed = seed + i * k
        samples = engine.generate([Request(ids, max_tokens=room, temperature=temperature, top_p=top_p,
                                           seed=first_seed, stop=stop, n=k)])[0]
        answers = [lm.tokenizer.decode(s.tokens, skip_special=True).strip() for s in samples]
        print(f"\n[{i + 1}/{len(convs)}] {user_text(convs[i][-1])}")
        for n, answer in enumerate(answers, 1):
            print(f"  {n}) {answer}")
        while True:
            try:
                text = input(f"ranking ({HELP}): ").strip()
            except EOFError:
                text = "q"
            if text in ("q", "s"):
                break
            groups = parse_ranking(text, k)
            if groups is None:
                print(f"  not a ranking of answers 1..{k}; {HELP}")
            elif len(groups) < 2:
                print("  all tied: nothing is preferred (type s to skip)")
            elif len(set(answers)) < k:
                print("  two answers are the same text; type s to skip")
            else:
                break
        if text == "q":
            break
        if text == "s":
            continue
        meta = {"prompt_index": i, "seeds": list(range(first_seed, first_seed + k)), "temperature": temperature,
                "model": str(model_dir)}
        record = record_for(convs[i], answers, groups, meta)
        parse_preference(record, f"{out_path} (new record)")  # what we write, the reader accepts
        append_record(out_path, record)
        written += 1
    print(f"{written} ranking(s) appended to {out_path}", file=sys.stderr)
    return written
