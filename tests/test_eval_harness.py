"""`lmforge eval`: lm-evaluation-harness's scoring rules, few-shot prompts, generation, perplexity, errors."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from helpers import fails

from lmforge.cli import main
from lmforge.core.errors import LMForgeError
from lmforge.eval import harness
from lmforge.eval.builtin import arithmetic_docs, pydocs_docs
from lmforge.eval.evaluate import evaluate_text
from lmforge.eval.harness import encode_pair, loglikelihoods, run_task
from lmforge.eval.tasks import Task, load_task
from lmforge.formats.load import load_model
from lmforge.inference.client import LocalGenerator


@pytest.fixture(scope="module")
def lm(tiny_run):
    return load_model(tiny_run, "cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_acc_and_acc_norm_by_hand(monkeypatch):
    # Choice 0 has the larger summed log-prob (acc picks it); per character, choice 1 wins (acc_norm).
    task = Task("t", "choice", [{"context": "Q", "choices": ["a", "bbbb"], "answer": 1},
                                {"context": "R", "choices": ["cc", "d"], "answer": 0}])
    monkeypatch.setattr(harness, "loglikelihoods", lambda lm, pairs, bs: [-2.0, -4.0, -3.0, -2.0])
    no_model = SimpleNamespace(meta={"kind": "causal-lm"}, path="m", config=SimpleNamespace(context_length=64),
                               tokenizer=SimpleNamespace(encode=lambda text, special: list(text)))  # no model runs
    metrics, samples = run_task(task, lm=no_model)
    # doc 1: acc -> 0 (wrong), norm: -2/1 vs -4/4 -> 1 (right); doc 2: acc -> 1 (wrong), norm: -3/2 vs -2/1 -> 0 (right)
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0
    assert [s["pick"] for s in samples] == [0, 1] and [s["pick_norm"] for s in samples] == [1, 0]
    assert metrics["acc_stderr"] == 0.0 and metrics["examples"] == 2


def test_stderr_is_the_sample_standard_error():
    vals = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75  # float64 over four values, another operation order: ~1e-16, default rel 1e-6
    assert harness.mean_stderr(vals) == pytest.approx((sum((v - mu) ** 2 for v in vals) / 3) ** 0.5 / 2)


def reference_loglikelihood(lm, context: str, continuation: str) -> float:
    """The harness's rule written out, one sequence per forward pass, full log-softmax."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = lm.tokenizer
    if context:
        whole, ctx = tok.encode(context + continuation, special=False), tok.encode(context, special=False)
        cont = whole[len(ctx):]
    else:
        ctx, cont = [tok.eot_id], tok.encode(continuation, special=False)
    seq = (ctx + cont)[-(lm.config.context_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([seq[:-1]])).float(), -1)[0]
    n = len(cont)
    return sum(logp[len(seq) - 1 - n + j, t].item() for j, t in enumerate(cont))


@pytest.mark.numerics
def test_batched_loglikelihoods_match_one_at_a_time(lm):
    long = "The new module returns a valid key. " * 8  # longer than the 32-token window: cut from the left
    pairs = [("The new", " function"), ("The new ", "list returns"), ("", "The path"), (long, " value"),
             ("The path reads a", " file.")]
    got = loglikelihoods(lm, pairs, batch_size=2)
    for (c, x), g in zip(pairs, got):  # padded batch vs one sequence, fp32 order: measured <=4.7e-6 on sums up to 18
        assert g == pytest.approx(reference_loglikelihood(lm, c, x), abs=1e-4)
    ctx, cont = encode_pair(lm.tokenizer, "The new ", "list")  # the trailing space joins the continuation
    assert lm.tokenizer.decode(ctx) == "The new" and lm.tokenizer.decode(cont) == " list"


@pytest.mark.numerics
def test_parity_with_transformers_on_an_exported_model(tiny_run, tmp_path):
    """lm-eval's HF backend, written out: the exported checkpoint through transformers gives the
    same log-likelihoods (so the same acc / acc_norm) as lmforge's batched scorer."""
    transformers = pytest.importorskip("transformers")
    from lmforge.formats.hf_dir import export_hf

    export_hf(tiny_run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf", "cpu")
    pairs = [("The new", " function"), ("The empty list returns a", " value."), ("The path", " reads")]
    for (context, cont), ours in zip(pairs, loglikelihoods(lm, pairs)):
        whole = tok(context + cont, add_special_tokens=False).input_ids
        ctx = tok(context, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits.float(), -1)[0]
        ref = sum(logp[j - 1, whole[j]].item() for j in range(len(ctx), len(whole)))
        assert ours == pytest.approx(ref, abs=1e-4)  # transformers vs ours, fp32 order: measured <=1.4e-6 on sums ~8


def test_few_shot_prompts_follow_the_harness():
    docs = [{"context": f"Q{i}?", "choices": ["x", "y"], "answer": i % 2} for i in range(6)]
    task = Task("t", "choice", docs)
    got = task.contexts(2, seed=1234)
    rng = random.Random(1234)  # the rule: one RNG, k+1 drawn per document, the document dropped, first k kept
    for doc, prompt in zip(docs, got):
        shots = [d for d in rng.sample(docs, 3) if d != doc][:2]
        assert prompt == "".join(f"{d['context']} {d['choices'][d['answer']]}\n\n" for d in shots) + doc["context"]
        assert prompt.count(doc["context"]) == 1  # never its own example
    assert task.contexts(0) == [d["context"] for d in docs]
    assert task.contexts(2, seed=1) != got  # the seed matters
    pooled = Task("t", "generate", [{"prompt": "A:", "target": "1"}], pool=[{"prompt": f"P{i}:", "target": str(i)}
                                                                             for i in range(4)],
                  target_delimiter="", fewshot_delimiter="\n")
    rng = random.Random(7)
    ex = rng.sample(pooled.pool, 3)
    assert pooled.contexts(3, seed=7) == ["".join(f"{d['prompt']}{d['target']}\n" for d in ex) + "A:"]


@pytest.mark.numerics
def test_generation_goes_through_the_engine_and_scores(lm, tmp_path):
    gen = LocalGenerator(lm)
    prompts = ["The new", "The path reads", "The first"]
    answers = [gen.complete(p, max_tokens=6, stop=["."]) for p in prompts]
    rows = [{"prompt": p, "target": a} for p, a in zip(prompts, answers)]
    rows[2]["target"] = answers[2] + " nothing like it"
    yaml_path = tmp_path / "gen.yaml"
    write_jsonl(tmp_path / "gen.jsonl", rows)
    yaml_path.write_text('test: gen.jsonl\nstop: "."\nmax_tokens: 6\n')
    [task] = load_task(str(yaml_path))
    metrics, samples = run_task(task, lm, batch_size=2)
    assert [s["answer"] for s in samples] == answers  # batched greedy answers == the one-at-a-time ones
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["contains"] == pytest.approx(2 / 3)


def test_perplexity_tasks_are_evaluates_numbers(lm, tmp_path):
    path = write_jsonl(tmp_path / "ppl.jsonl", [{"text": "The new function returns a valid list."}] * 3)
    metrics, _ = run_task(load_task(str(path))[0], lm)
    assert metrics == {"kind": "perplexity", "shots": 0, **evaluate_text(lm, [str(path)])}


def test_eval_cli_on_builtin_and_own_tasks(tiny_run, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "The new", "choices": ["function", "zzz"],
                                              "answer": "function"}] * 4)
    code = main(["eval", str(tiny_run), "--task", "spam", "arithmetic", str(mc), "--limit", "6", "--shots", "1",
                 "--json", "--samples", str(tmp_path / "s.jsonl")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["results"]) == {"spam", "arithmetic", "mc"}
    assert out["results"]["spam"]["examples"] == 6 and 0 <= out["results"]["spam"]["acc"] <= 1
    assert "exact_match_stderr" in out["results"]["arithmetic"] and out["aggregate"]["examples"] == 6 + 6 + 4
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 16
    assert main(["eval", str(tiny_run), "--task", "spam", "--limit", "4"]) == 0
    assert "acc_norm" in capsys.readouterr().out


def test_builtin_tasks_are_deterministic():
    assert arithmetic_docs(5, 1) == arithmetic_docs(5, 1)
    assert arithmetic_docs(1, 3)[0]["target"] == str(eval(arithmetic_docs(1, 3)[0]["prompt"][17:-9]))
    docs = [f"mod.f{i}(x)\n\nReturn the f{i} of x, a value computed from the inputs given here." for i in range(6)]
    qs = pydocs_docs(docs + ["Module mod\n\nnot a function"], 4)
    assert len(qs) == 4 and all(len(q["choices"]) == 4 for q in qs)
    assert all("f" + q["choices"][q["answer"]][5:] not in q["context"] for q in qs)  # the name is masked
    assert qs == pydocs_docs(docs, 4)


def test_bad_tasks_are_one_line_errors(tiny_run, tmp_path, capsys):
    bad = {"no_choices": [{"context": "Q", "answer": 0}], "range": [{"context": "Q", "choices": ["a", "b"],
                                                                      "answer": 2}],
           "mixed": [{"context": "Q", "choices": ["a", "b"], "answer": 0}, {"prompt": "P", "target": "t"}]}
    for name, rows in bad.items():
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    fails(capsys, "a task record needs", "eval", str(tiny_run), "--task", str(tmp_path / "no_choices.jsonl"))
    fails(capsys, "out of range", "eval", str(tiny_run), "--task", str(tmp_path / "range.jsonl"))
    fails(capsys, "mixes kinds", "eval", str(tiny_run), "--task", str(tmp_path / "mixed.jsonl"))
    write_jsonl(tmp_path / "two.jsonl", [{"context": "Q", "choices": ["a", "b"], "answer": 0}] * 2)
    fails(capsys, "--shots 5 is more than the 1", "eval", str(tiny_run), "--task", str(tmp_path / "two.jsonl"),
          "--shots", "5")
    fails(capsys, "not a built-in task", "eval", str(tiny_run), "--task", "nope")
    fails(capsys, "missing required argument(s): MODEL_DIR", "eval", "--task", "spam")
    with pytest.raises(LMForgeError, match="needs a causal language model"):
        run_task(load_task("spam")[0], SimpleNamespace(meta={"kind": "classifier"}, path="m"))
    fails(capsys, "not both", "eval", str(tiny_run), "--api", "http://127.0.0.1:9/v1")


def test_prompts_cut_to_the_context_are_reported(lm, capsys):
    """5-shot arithmetic prompts overflow the 32-token test model: said on stderr, not silently cut."""
    [task] = load_task("arithmetic")
    run_task(task, lm, shots=5, limit=4)
    err = capsys.readouterr().err
    assert "warning: task arithmetic: 4 of 4 prompts are longer than the model's context (32 tokens)" in err
    assert "fewer than 5 examples are seen" in err
    run_task(Task("short", "generate", [{"prompt": "2+2=", "target": "4"}], max_tokens=4), lm)
    assert "warning" not in capsys.readouterr().err  # a prompt that fits
