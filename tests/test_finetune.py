"""Fine-tuning: classification, instruction following, LoRA, resume, chat."""

from __future__ import annotations

import csv
import json
import signal

import pytest
import torch
from helpers import fails, reverse_records, run_cli, spam_rows
from safetensors.torch import load_file

from lmforge import load
from lmforge.cli import main
from lmforge.data.records import read_instructions
from lmforge.text.templates import encode_segments, get_template
from lmforge.training.tasks.classify import ClassifyConfig, finetune_classify
from lmforge.training.tasks.instruct import InstructConfig, exact_match, finetune_instruct


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    d = tmp_path_factory.mktemp("spam")
    rows = spam_rows(400, seed=1)
    return write_jsonl(d / "train.jsonl", rows[:320]), write_csv(d / "val.csv", rows[320:])


def clf(base, train, val, out, **kw) -> ClassifyConfig:
    settings = dict(batch_size=8, max_steps=40, eval_every=20, lr=1e-3, device="cpu")
    return ClassifyConfig(base=str(base), train=str(train), val=str(val), out=str(out), **{**settings, **kw})


def test_classifier_learns_a_separable_task(ft_base, spam, tmp_path, capsys):
    train, val = spam
    out = tmp_path / "clf"
    state = finetune_classify(clf(ft_base, train, val, out))
    m = state["metrics"]
    assert m["val_accuracy"] >= 0.95 and m["val_macro_f1"] >= 0.95
    assert set(m["val_per_class"]) == {"ham", "spam"} and len(m["val_confusion"]) == 2
    assert (out / "loss.png").exists() and json.loads((out / "config.json").read_text())["labels"] == ["ham", "spam"]
    capsys.readouterr()
    assert main(["classify", str(out), "--text", "Win free cash prize now", "The new list holds a key.",
                 "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]  # fp32 softmax, rounded to 6 decimals
    assert [x["label"] for x in lines] == ["spam", "ham"] and abs(sum(lines[0]["probs"].values()) - 1) < 1e-4
    assert main(["evaluate", str(out), "--data", str(val)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] >= 0.95 and report["confusion"][0][0] > 0


@pytest.mark.parametrize("layers", ["head", "1"])
def test_frozen_layers_stay_bit_identical(ft_base, spam, tmp_path, layers):
    train, val = spam
    out = tmp_path / f"clf_{layers}"
    finetune_classify(clf(ft_base, train, val, out, train_layers=layers, max_steps=5))
    base, tuned = load_file(str(ft_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    frozen = [k for k in base if not (layers == "1" and (k.startswith("blocks.1.") or k.startswith("norm.")))]
    assert all(torch.equal(base[k], tuned[f"backbone.{k}"]) for k in frozen)  # never updated: bit-identical
    if layers == "1":
        assert not torch.equal(base["blocks.1.mlp.fc.weight"], tuned["backbone.blocks.1.mlp.fc.weight"])


def test_lora_classifier_adapter_merge_and_frozen_base(ft_base, spam, tmp_path, capsys):
    train, val = spam
    out = tmp_path / "lora"
    finetune_classify(clf(ft_base, train, val, out, lora_rank=4, lora_targets=["all"], max_steps=30))
    err = capsys.readouterr().err
    assert "trainable parameters:" in err and "(100.00%)" not in err
    assert not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter.safetensors"))
    assert all(".lora_" in k or k.startswith("head.") for k in adapter)
    assert (out / "adapter.safetensors").stat().st_size < (ft_base / "model.safetensors").stat().st_size / 3
    lm = load(out, device="cpu")
    base = load_file(str(ft_base / "model.safetensors"))
    mine = lm.model.state_dict()
    assert all(torch.equal(base[k], mine[f"backbone.{k}"]) for k in base if not k.startswith("lm_head"))
    assert main(["merge-lora", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = load(tmp_path / "merged", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("Claim your free prize") + [lm.tokenizer.eot_id]])
    with torch.no_grad():  # W + s*B@A vs W x + s*B(A x), fp32: ~1e-6 on outputs <2 (measured 0); plus rtol 1e-5
        assert torch.allclose(lm.model(ids), merged.model(ids), atol=1e-5)
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("reverse")
    return write_jsonl(d / "train.jsonl", reverse_records(360, seed=0)), \
        write_jsonl(d / "test.jsonl", reverse_records(40, seed=99))


def test_instruction_tuning_raises_exact_match(ft_base, reverse_data, tmp_path, capsys):
    train, test = reverse_data
    out = tmp_path / "inst"
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(train), out=str(out), max_steps=300, batch_size=16,
                                     lr=1e-2, eval_every=150, device="cpu"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_samples" in r for r in rows) and "val_loss" in rows[-1]
    convs = read_instructions(test)
    base, tuned = load(ft_base, device="cpu"), load(out, device="cpu")
    template = get_template("chatml", base.tokenizer)
    before = exact_match(base.model, base.tokenizer, template, convs)
    after = exact_match(tuned.model, tuned.tokenizer, template, convs)
    assert after >= before + 0.2, (before, after)  # typically 0 -> 0.4-0.7
    assert main(["evaluate", str(out), "--data", str(test)]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == pytest.approx(after)
    # the saved model knows its format: generation stops at the end of the answer
    assert json.loads((out / "config.json").read_text())["chat_template"]["name"] == "chatml"


def test_prompt_tokens_get_zero_gradient(ft_base):
    from lmforge.data.collate import collate
    from lmforge.training.tasks.instruct import encode_conversations

    lm = load(ft_base, device="cpu")
    template = get_template("alpaca", lm.tokenizer)
    (ids, labels), = encode_conversations([[{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "Say hi", "input": ""},
                                            {"role": "assistant", "content": "hi there"}]],
                                          lm.tokenizer, template, 64)[0]
    batch = collate([(ids, labels)], 0)
    hidden = {}

    def keep(module, inputs, output):  # the final hidden states, with their gradient kept
        output.retain_grad()
        hidden["h"] = output

    lm.model.norm.register_forward_hook(keep)
    lm.model.train()
    lm.model(batch["x"], batch["y"]).backward()
    grad = hidden["h"].grad[0].abs().sum(-1)
    target_is_response = batch["y"][0] != -100
    assert grad[~target_is_response].max().item() == 0.0  # no path from the loss: exactly zero, not small
    assert (grad[target_is_response] > 0).all()
    n_response = len(lm.tokenizer.encode("hi there")) + 1  # + end-of-text
    assert int(target_is_response.sum()) == n_response


def test_templates(ft_base, tmp_path):
    from lmforge.text.tokenizer import Tokenizer

    tok = Tokenizer.from_file(ft_base)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    segs = get_template("chatml", tok).render(conv, tok)
    assert "".join(t for t, train, _ in segs if train) == "A1<|im_end|>A2<|im_end|>"
    jinja = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.config["chat_template"] = jinja
    t = get_template("auto", tok)
    assert t.name == "jinja"
    trained = "".join(x for x, train, _ in t.render(conv, tok) if train)
    assert trained == "A1<|im_end|>\nA2<|im_end|>\n"
    prompt, _ = encode_segments(tok, t.render(conv[:2], tok, add_generation_prompt=True))
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    alpaca = "".join(x for x, _, _ in get_template("alpaca", tok).render(conv[:3], tok))
    assert alpaca.startswith("Be brief.\n\n### Instruction:\nQ1\n\n### Response:\nA1")


def test_lora_instruct_resumes_exactly_and_keeps_base_frozen(ft_base, reverse_data, tmp_path, capsys):
    train, _ = reverse_data

    def cfg(out, **kw):
        return InstructConfig(base=str(ft_base), data=str(train), out=str(out), max_steps=12, batch_size=8,
                              lora_rank=4, lora_dropout=0.1, save_every=4, eval_every=6, samples=1, device="cpu",
                              **kw)

    finetune_instruct(cfg(tmp_path / "full"))
    state = finetune_instruct(cfg(tmp_path / "part"), on_step=lambda s: s == 5 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 5
    assert finetune_instruct(cfg(tmp_path / "part", resume=True))["step"] == 12
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter.safetensors"))
    # resumed vs uninterrupted: the same kernels on the same shapes in the same order (AdamW, fp32, one process,
    # dropout's RNG restored): exact, as it measures (it was allclose 1e-6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_b" in k)
    lm, base = load(tmp_path / "full", device="cpu"), load(ft_base, device="cpu")
    tuned_sd, base_sd = lm.model.state_dict(), base.model.state_dict()
    assert all(torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd)
    fails(capsys, "merge it first", "export", str(tmp_path / "full"), "--out", str(tmp_path / "hf"))
    assert main(["merge-lora", str(tmp_path / "full"), "--out", str(tmp_path / "merged")]) == 0
    merged = load(tmp_path / "merged", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("Reverse the words: key path file")])
    with torch.no_grad():  # merged vs adapter's extra products, fp32: measured 2.4e-6 on logits ~10 (+ rtol 1e-5)
        assert torch.allclose(lm.model(ids), merged.model(ids), atol=1e-5)


def test_packing(ft_base, reverse_data, tmp_path):
    from lmforge.data.collate import pack

    rows = pack([([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9])], max_len=5)
    assert rows == [([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9])]
    train, _ = reverse_data
    state = finetune_instruct(InstructConfig(base=str(ft_base), data=str(train), out=str(tmp_path / "p"),
                                             pack=True, max_steps=3, samples=0, device="cpu"))
    assert state["step"] == 3


def test_chat_session(ft_base, reverse_data, tmp_path):
    train, _ = reverse_data
    out = tmp_path / "chat"
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(train), out=str(out), max_steps=20, samples=0,
                                     lr=3e-3, device="cpu"))
    p = run_cli("chat", str(out), "--temperature", "0", "--max-new-tokens", "8",
                input="Reverse the words: key path\n/reset\nhi\n" + "a long message " * 40 + "\n/bogus\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("assistant>") == 2 and "(conversation reset)" in p.stdout
    assert "too long for the model's context window" in p.stdout and "unknown command /bogus" in p.stdout


def test_chat_history_is_trimmed_to_the_context(ft_base):
    from lmforge.inference.chat import fit_history

    lm = load(ft_base, device="cpu")
    template = get_template("chatml", lm.tokenizer)
    history = [{"role": "system", "content": "sys"}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "ok " * 3}]
    history.append({"role": "user", "content": "last"})
    ids = fit_history(lm, template, history, reserve=16)
    assert len(ids) + 16 <= lm.config.context_length
    assert history[0]["role"] == "system" and history[-1]["content"] == "last" and len(history) < 14


# --- bad input ----------------------------------------------------------------------------------



def test_bad_classification_input(ft_base, tmp_path, capsys):
    out = str(tmp_path / "o")
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x y", "category": "a"}, {"text": "z", "category": "b"}])
    fails(capsys, "no column 'label'", "finetune", "classify", str(ft_base), "--train", str(f), "--out", out)
    f = write_jsonl(tmp_path / "b.jsonl", [{"text": f"t{i}", "label": "only"} for i in range(10)])
    fails(capsys, "only one class ('only')", "finetune", "classify", str(ft_base), "--train", str(f), "--out", out)
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine", "label": "a"}, {"text": "  ", "label": "b"}])
    fails(capsys, "1 row(s) with empty text", "finetune", "classify", str(ft_base), "--train", str(f), "--out", out)
    fails(capsys, "is not a model directory", "finetune", "classify", str(tmp_path), "--train", str(f), "--out", out)
    good = write_jsonl(tmp_path / "d.jsonl", spam_rows(40))
    fails(capsys, "'nope' matches no linear layer", "finetune", "classify", str(ft_base), "--train", str(good),
        "--out", out, "--lora-rank", "2", "--lora-targets", "nope")
    assert not (tmp_path / "o").exists()


def test_bad_instruction_input(ft_base, tmp_path, capsys):
    from hf_fixtures import sentencepiece_style, tiny_hf_model  # a tokenizer without ChatML tokens

    out = str(tmp_path / "o")
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "do it"}])
    fails(capsys, "a.jsonl:1: record has no 'output'", "finetune", "instruct", str(ft_base), "--data", str(f),
        "--out", out)
    f = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "robot", "content": "beep"}]}])
    fails(capsys, "unknown role 'robot'", "finetune", "instruct", str(ft_base), "--data", str(f), "--out", out)
    hf = tmp_path / "hf"
    tiny_hf_model("mistral", hf)
    assert sentencepiece_style  # (the mistral fixture's tokenizer has no <|im_start|>)
    f = write_jsonl(tmp_path / "c.jsonl", reverse_records(5))
    fails(capsys, "chatml template needs the special tokens", "finetune", "instruct", str(hf), "--data", str(f),
        "--out", out, "--template", "chatml")
    fails(capsys, "no chat_template", "finetune", "instruct", str(hf), "--data", str(f), "--out", out,
        "--template", "model")
    assert not (tmp_path / "o").exists()


def test_classification_metrics_by_hand():
    from lmforge.training.tasks.classify import classification_metrics

    m = classification_metrics(preds=[0, 0, 1, 1, 1, 2], gold=[0, 1, 1, 1, 2, 2], labels=["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-4)  # counts divided; abs 1e-4 allows 4-decimal rounding
    third = pytest.approx(2 / 3, abs=1e-4)
    assert m["per_class"]["b"] == {"precision": third, "recall": third, "f1": third, "support": 3}
    assert m["per_class"]["a"]["precision"] == 0.5 and m["per_class"]["c"]["recall"] == 0.5
    f1 = [0.6667, 2 / 3, 0.6667]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-3)


def test_lora_instruct_warns_when_the_frozen_head_cannot_learn_to_stop(ft_base, reverse_data, tmp_path, capsys):
    from lmforge.data.records import read_instructions
    from lmforge.formats.load import load_parts
    from lmforge.text.templates import get_template
    from lmforge.training.tasks.instruct import encode_conversations, frozen_head_warning

    train, _ = reverse_data
    model, tok, _ = load_parts(ft_base)
    template = get_template("chatml", tok)
    examples, _ = encode_conversations(read_instructions(train)[:16], tok, template, 65)
    stop = template.stop_tokens(tok)
    # the base never saw <|im_end|> in pretraining: it ranks it far down where answers end
    assert "never stop" in (frozen_head_warning(model, examples, stop) or "")

    class Knows(torch.nn.Module):  # a model that does predict the end of turn everywhere: no warning
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def hidden(self, ids):
            return torch.zeros(*ids.shape, 1)

        def head(self, h):
            logits = torch.zeros(*h.shape[:-1], model.cfg.vocab_size)
            logits[..., im_end] = 1.0
            return logits

    im_end = tok.token_id("<|im_end|>")
    assert any(im_end in labels for _, labels in examples)
    assert frozen_head_warning(Knows(), examples, [im_end]) is None


def test_instruct_learns_tool_calls_and_marks_the_model(ft_base, tmp_path):
    """OpenAI-format tool conversations: loss on the assistant's call and answer, and the model
    directory says it was tuned on tool calls (so `lmforge agent` calls tools natively)."""
    from helpers import random_model

    from lmforge.inference.client import LocalGenerator

    # room for the tools' description: ft_base's context is 64 tokens
    base = random_model(ft_base / "tokenizer.json", tmp_path / "base", 512, n_layer=1)
    tool = {"type": "function", "function": {"name": "calc", "parameters": {
        "type": "object", "properties": {"e": {"type": "string"}}, "required": ["e"]}}}
    rows = []
    for i in range(24):
        a, b = i % 7 + 1, i % 5 + 2
        fn = {"name": "calc", "arguments": json.dumps({"e": f"{a}+{b}"})}
        rows.append({"tools": [tool], "messages": [
            {"role": "user", "content": f"{a}+{b}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": fn}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": str(a + b)},
            {"role": "assistant", "content": str(a + b)}]})
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tooled"
    finetune_instruct(InstructConfig(base=str(base), data=str(data), out=str(out), max_steps=4, batch_size=4,
                                     eval_every=1000, samples=0, device="cpu"))
    meta = json.loads((out / "config.json").read_text())
    assert meta["tool_calls"] is True and LocalGenerator(load(out, device="cpu")).native_tools
    assert not LocalGenerator(load(ft_base, device="cpu")).native_tools


def test_a_classifier_adapter_is_no_base_and_merging_would_not_help(tmp_path, capsys):
    import json
    import shutil

    from test_gguf import make_dir

    src = make_dir(tmp_path / "m")
    clf = tmp_path / "clf-adapter"
    shutil.copytree(src, clf)
    meta = json.loads((clf / "config.json").read_text())
    (clf / "config.json").write_text(json.dumps({**meta, "kind": "classifier", "lora": {"rank": 4}}))
    (clf / "adapter.safetensors").write_bytes(b"")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    line = fails(capsys, "is a classifier; this fine-tuning needs a causal-lm base", "finetune", "instruct", str(clf),
                 "--data", str(data), "--out", str(tmp_path / "o"))
    assert "merge" not in line
