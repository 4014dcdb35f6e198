"""`lmforge eval`: score a model on tasks (see `eval.tasks`) the way lm-evaluation-harness does.

- Multiple choice: each choice is scored as the log-probability of `target_delimiter + choice`
  after the context, summed over its tokens. `acc` takes the argmax of the sums; `acc_norm` the
  argmax of the sums divided by the choice's length in characters (the harness's rule: its docs
  say bytes, its code counts characters). Pairs are encoded as the harness encodes them: trailing
  spaces of the context move to the continuation, the continuation is what encoding the whole
  adds to the context's tokens, and an empty context is the end-of-text token.
- Generation: greedy answers (through the engine, batched; or an OpenAI-compatible server), cut
  at the first stop string; `exact_match` compares them stripped, `contains` looks for the target.
- Perplexity: `lmforge evaluate`'s loss, perplexity and bits per byte on the file's texts.

Standard errors are the harness's: the sample standard deviation over documents / sqrt(n).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast
from ..formats.kinds import require
from ..formats.load import Loaded
from .tasks import HARNESS_SEED, Task


def mean_stderr(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation, special=False)
    whole = tokenizer.encode(context + continuation, special=False)
    ctx = tokenizer.encode(context, special=False)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(lm: Loaded, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each continuation after its context, in batches: the sequences
    are right-padded into one forward pass (a causal model's real tokens never see the padding),
    longest first; a sequence longer than the context window loses its oldest context tokens."""
    ctx_len = lm.config.context_length
    seqs = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(lm.tokenizer, context, continuation)
        if not cont:
            raise LMForgeError(f"the choice {continuation!r} encodes to no tokens")
        if len(cont) > ctx_len:
            raise LMForgeError(f"a choice of {len(cont)} tokens does not fit the model's context of {ctx_len}")
        whole = (ctx + cont)[-(ctx_len + 1):]
        seqs.append((whole[:-1], whole[1:], len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = [0.0] * len(seqs)
    lm.model.eval()
    device = lm.device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(seqs[chunk[0]][0])
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp, tgt, n = seqs[i]
            inputs[row, :len(inp)] = torch.tensor(inp)
            targets[row, len(inp) - n:len(inp)] = torch.tensor(tgt[-n:])
        with autocast(device):
            losses = lm.model(inputs.to(device), targets.to(device), reduction="none")
        for row, i in enumerate(chunk):
            out[i] = -losses[row].float().sum().item()
    return out


def score_choice(lm: Loaded, task: Task, docs: list[dict], contexts: list[str],
                 batch_size: int) -> tuple[dict, list[dict]]:
    pairs = [(ctx, task.target_delimiter + c) for ctx, doc in zip(contexts, docs) for c in doc["choices"]]
    lls = loglikelihoods(lm, pairs, batch_size)
    acc, acc_norm, samples, i = [], [], [], 0
    for ctx, doc in zip(contexts, docs):
        k = len(doc["choices"])
        ll = lls[i:i + k]
        i += k
        pick = max(range(k), key=ll.__getitem__)
        pick_norm = max(range(k), key=lambda j: ll[j] / len(doc["choices"][j]))
        acc.append(float(pick == doc["answer"]))
        acc_norm.append(float(pick_norm == doc["answer"]))
        samples.append({"context": ctx, "choices": doc["choices"], "answer": doc["answer"], "loglikelihoods": ll,
                        "pick": pick, "pick_norm": pick_norm})
    return {"acc": _mean(acc), "acc_stderr": mean_stderr(acc), "acc_norm": _mean(acc_norm),
            "acc_norm_stderr": mean_stderr(acc_norm)}, samples


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def generate_local(lm: Loaded, prompts: list[str], max_tokens: int, slots: int) -> list[str]:
    """Greedy answers through the engine, all prompts in flight together (`slots` at a time). A
    prompt too long for the window keeps its most recent tokens."""
    from ..inference.engine import Engine, Request
    from ..inference.prefix_cache import PrefixCache

    ctx_len = lm.config.context_length
    max_tokens = min(max_tokens, ctx_len - 1)
    keep = ctx_len - max_tokens
    requests = [Request(lm.tokenizer.encode(p, special=False)[-keep:] or [lm.tokenizer.eot_id], max_tokens=max_tokens,
                        temperature=0.0, stop=lm.stop_ids()) for p in prompts]
    # Few-shot prompts share their examples: computed once (the prefix cache), reused by every document.
    samples = Engine(lm.model, slots=slots, prefix_cache=PrefixCache(device=lm.device)).generate(requests)
    return [lm.tokenizer.decode(s[0].tokens) for s in samples]


def score_generate(answers: list[str], task: Task, docs: list[dict], contexts: list[str]) -> tuple[dict, list[dict]]:
    em, contains, samples = [], [], []
    for ctx, doc, answer in zip(contexts, docs, answers):
        answer = cut_at_stop(answer, task.stop)
        em.append(float(answer.strip() == doc["target"].strip()))
        contains.append(float(doc["target"].strip() in answer))
        samples.append({"prompt": ctx, "target": doc["target"], "answer": answer})
    return {"exact_match": _mean(em), "exact_match_stderr": mean_stderr(em), "contains": _mean(contains),
            "contains_stderr": mean_stderr(contains)}, samples


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_task(task: Task, lm: Loaded | None = None, generator=None, shots: int = 0, seed: int = HARNESS_SEED,
             limit: int | None = None, batch_size: int = 16) -> tuple[dict, list[dict]]:
    """(metrics, per-document samples) of one task. `lm`: a loaded model; `generator`: an
    `inference.client.Generator` for a server (generation tasks only)."""
    head = {"kind": task.kind, "shots": shots}
    if task.kind == "perplexity":
        if lm is None:
            raise LMForgeError(f"task {task.name}: perplexity needs a local model (log-likelihoods), not --api")
        if shots:
            raise LMForgeError(f"task {task.name}: perplexity tasks take no --shots")
        from .evaluate import evaluate_text

        return {**head, **evaluate_text(lm, [task.path], batch_size=batch_size)}, []
    if not task.docs:
        raise LMForgeError(f"task {task.name} has no documents")
    if lm is not None:
        require(lm.meta, str(lm.path), f"task {task.name} ({task.kind}) needs a causal language model",
                lambda k: k.generates)
    contexts = task.contexts(shots, seed, limit)
    docs = task.docs[:limit]
    if lm is not None:
        _warn_if_cut(task, lm, contexts, shots)
    if task.kind == "choice":
        if lm is None:
            raise LMForgeError(f"task {task.name}: multiple choice needs a local model (log-likelihoods); --api "
                               "evaluates generation tasks")
        metrics, samples = score_choice(lm, task, docs, contexts, batch_size)
    elif lm is not None:
        metrics, samples = score_generate(generate_local(lm, contexts, task.max_tokens, batch_size), task, docs,
                                          contexts)
    else:
        answers = [generator.complete(c, max_tokens=task.max_tokens, temperature=0.0, stop=task.stop)
                   for c in contexts]
        metrics, samples = score_generate(answers, task, docs, contexts)
    return {**head, "examples": len(docs), **metrics}, samples


def _warn_if_cut(task: Task, lm: Loaded, contexts: list[str], shots: int) -> None:
    """Say so when prompts are longer than the model's window: they lose their oldest tokens, which
    with --shots are the first examples (lm-evaluation-harness cuts the same way, also silently)."""
    room = lm.config.context_length - (task.max_tokens if task.kind == "generate" else 1)
    cut = sum(len(lm.tokenizer.encode(c, special=False)) > room for c in contexts)
    if cut:
        print(f"warning: task {task.name}: {cut} of {len(contexts)} prompts are longer than the model's context "
              f"({lm.config.context_length} tokens) and lose their oldest tokens"
              + (f", so fewer than {shots} examples are seen (try fewer --shots)" if shots else ""), file=sys.stderr)


def aggregate(results: dict[str, dict]) -> dict | None:
    """The document-weighted mean of each task's main score (acc_norm for multiple choice,
    exact_match for generation) and its standard error; None when no task has one."""
    scores = [(r["examples"], r["acc_norm"], r["acc_norm_stderr"]) if r["kind"] == "choice" else
              (r["examples"], r["exact_match"], r["exact_match_stderr"])
              for r in results.values() if r["kind"] != "perplexity"]
    if not scores:
        return None
    total = sum(n for n, _, _ in scores)
    se = [(n * s) ** 2 for n, _, s in scores if s is not None]
    return {"score": sum(n * v for n, v, _ in scores) / total,
            "score_stderr": math.sqrt(sum(se)) / total if se else None, "tasks": len(scores), "examples": total}
