"""Training encoder-decoders: span corruption and text infilling on raw text, input -> target pairs
from scratch, `finetune seq2seq` (full and LoRA, resume), `evaluate` and `generate` on them, and the
one-line errors of bad input."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from helpers import assert_clean_error, fails, run_cli
from safetensors.torch import load_file

from lmforge.api import load
from lmforge.cli import main
from lmforge.data.noising import span_corrupt
from lmforge.inference.generate import encode_text, generate_seq2seq_ids
from lmforge.training.config import PretrainConfig, Seq2SeqConfig
from lmforge.training.pretrain import pretrain
from lmforge.training.tasks.seq2seq import PairsTask, encode_pairs, finetune_seq2seq

LETTERS = "abcdefgh"


def reversal_pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Distinct strings of 3-5 letters -> the same letters in reverse order: learnable in seconds,
    and a model that copies its input (or guesses) gets almost none right."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        w = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if w not in seen:
            seen.add(w)
            out.append({"input": w, "target": " ".join(reversed(w.split()))})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on one thread than on two contending with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    d = tmp_path_factory.mktemp("reversal")
    train = reversal_pairs(1500, 0)
    valid = reversal_pairs(64, 1, {r["input"] for r in train})
    return write_jsonl(d / "train.jsonl", train), write_jsonl(d / "valid.jsonl", valid)


@pytest.fixture(scope="module")
def scratch_t5(tmp_path_factory, reversal):
    """A tiny T5 trained from scratch on the reversal pairs (pretrain --objective seq2seq)."""
    out = tmp_path_factory.mktemp("runs") / "t5"
    state = pretrain(PretrainConfig(objective="seq2seq", data=[reversal[0]], val_data=[reversal[1]], out=str(out),
                                    n_layer=2, n_embd=64, context_length=16, max_steps=300, eval_every=300,
                                    batch_size=32, vocab_size=300, device="cpu", tensorboard=False, log_every=50))
    return out, state


def test_from_scratch_t5_learns_to_reverse(scratch_t5, reversal):
    out, state = scratch_t5
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "seq2seq" and meta["model"]["n_decoder_layer"] == 2
    assert meta["model"]["pos_embedding"] == "relative"
    # held-out strings: a copier would score the palindromes only (a few percent)
    assert state["metrics"]["val_exact_match"] >= 0.5, state["metrics"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 5


@pytest.mark.parametrize("objective", ["span", "denoise"])
def test_span_and_denoise_pretraining(objective, corpus_dir, tmp_path):
    out = tmp_path / objective
    state = pretrain(PretrainConfig(objective=objective, data=[str(corpus_dir)], out=str(out), n_layer=1, n_embd=32,
                                    context_length=32, max_steps=30, eval_every=30, eval_batches=2, batch_size=8,
                                    vocab_size=384, lr=1e-2, device="cpu", tensorboard=False, log_every=5))
    meta = json.loads((out / "config.json").read_text())
    arch = {"span": "t5", "denoise": "bart"}[objective]
    assert meta["kind"] == "seq2seq" and meta["model"]["extra"] == {} and state["metrics"]["val_loss"] > 0
    assert (meta["model"]["pos_embedding"], meta["model"]["norm_position"]) == \
        {"t5": ("relative", "pre"), "bart": ("learned", "post")}[arch]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows  # from ~ln(vocab) down
    lm = load(out, device="cpu")
    if objective == "span":  # T5's sentinels, <extra_id_0> last; span corruption as data/noising.py does it
        sentinels = lm.tokenizer.sentinel_ids()
        assert len(sentinels) == 100 and sentinels[0] == lm.tokenizer.vocab_size - 1
    text = "The function returns the value of the argument."
    ids = lm.tokenizer.encode(text)
    if objective == "span":
        src, tgt = span_corrupt(ids, np.random.default_rng(0), sentinels, lm.tokenizer.eot_id)
        assert tgt[0] == sentinels[0] and src[-1] == tgt[-1] == lm.tokenizer.eot_id
    out_text = lm.generate(text, max_new_tokens=8, temperature=0)
    assert isinstance(out_text, str)


def test_pairs_loss_is_on_target_tokens_only(scratch_t5):
    """The task's loss and gradient equal a hand computation: cross-entropy over the target
    tokens (each target token and its end), the source never predicted, padding ignored."""
    lm = load(scratch_t5[0], device="cpu")
    model, tok = lm.model.float().train(), lm.tokenizer
    pairs, _ = encode_pairs(tok, ["a b c", "h g f e d"], ["c b a", "d e f g h"], 16)
    task = PairsTask(pairs, [], ([], []), tok, model.cfg.decoder_start_token_id, 0, 2, 0, 0)
    batch = task.batch(0, 2)
    assert sorted(map(len, (t for _, t in pairs))) == sorted((batch["labels"] != -100).sum(1).tolist())
    mean, weight, _ = task.loss(model, batch)
    assert weight == sum(len(t) for _, t in pairs)
    model.zero_grad()
    mean.backward()
    auto = model.wte.weight.grad.clone()

    model.zero_grad()
    nats = 0.0
    for src, tgt in pairs:  # one pair at a time, no padding: start token, then the target teacher-forced
        dec_in = torch.tensor([[model.cfg.decoder_start_token_id] + tgt[:-1]])
        logits = model.head(model.decode(dec_in, model.encode(torch.tensor([src]))))[0]
        nats = nats + F.cross_entropy(logits.float(), torch.tensor(tgt), reduction="sum")
    hand = nats / weight
    hand.backward()
    assert torch.allclose(mean, hand, atol=1e-5)
    assert torch.allclose(auto, model.wte.weight.grad, atol=1e-6)


def test_finetune_seq2seq_full_lora_resume(scratch_t5, tmp_path):
    base = scratch_t5[0]
    extra = reversal_pairs(200, 7)
    data = write_jsonl(tmp_path / "more.jsonl", [{"question": r["input"], "answer": r["target"]} for r in extra])

    def cfg(out, **kw):
        return Seq2SeqConfig(base=str(base), data=data, input_column="question", target_column="answer",
                             out=str(tmp_path / out), max_steps=8, batch_size=8, save_every=4, eval_every=4,
                             eval_batches=2, samples=1, device="cpu", tensorboard=False, **kw)

    full = finetune_seq2seq(cfg("full"))
    assert full["step"] == 8 and 0 <= full["metrics"]["val_exact_match"] <= 1 and full["metrics"]["val_loss"] > 0
    assert json.loads((tmp_path / "full" / "config.json").read_text())["kind"] == "seq2seq"

    finetune_seq2seq(cfg("lora", lora_rank=4))
    state = finetune_seq2seq(cfg("part", lora_rank=4),
                             on_step=lambda s: s == 5 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 5
    assert finetune_seq2seq(cfg("part", lora_rank=4, resume=True))["step"] == 8
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("lora", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted
    assert any("cross_attn.kv" in k for k in a) and any("decoder.blocks.0.attn.qkv" in k for k in a)
    tuned, plain = load(tmp_path / "lora", device="cpu"), load(base, device="cpu")
    base_sd, tuned_sd = plain.model.state_dict(), tuned.model.state_dict()
    assert all(torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd)  # LoRA leaves the base frozen
    assert isinstance(tuned.generate("a b c", temperature=0), str)


def test_evaluate_and_generate_cli(scratch_t5, reversal, capsys):
    out = scratch_t5[0]
    lm = load(out, device="cpu")
    rows = [json.loads(x) for x in open(reversal[1])]
    # references made one example at a time by the unbatched cached loop: evaluate's batching must agree
    preds = []
    for r in rows:
        steps = generate_seq2seq_ids(lm.model, encode_text(lm.tokenizer, r["input"])[0], 16,
                                     stop_ids={lm.tokenizer.eot_id})
        preds.append(lm.tokenizer.decode([s.token for s in steps], skip_special=True))
    refs = [r["target"] for r in rows]
    assert main(["evaluate", str(out), "--data", reversal[1], "--batch-size", "5", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["examples"] == len(rows) and got["loss"] > 0
    assert got["exact_match"] == round(sum(p == t for p, t in zip(preds, refs)) / len(refs), 4)
    assert got["bleu"] == round(sacrebleu.corpus_bleu(preds, [refs]).score, 4)
    assert got["chrf"] == round(sacrebleu.corpus_chrf(preds, [refs]).score, 4)

    assert main(["generate", str(out), "--prompt", rows[0]["input"], "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == preds[0] + "\n"
    stop = preds[0][len(preds[0]) // 2]  # the engine's stop strings work for encoder-decoders too
    assert main(["generate", str(out), "--prompt", rows[0]["input"], "--temperature", "0", "--device", "cpu",
                 "--stop", stop]) == 0
    assert capsys.readouterr().out == preds[0][:preds[0].index(stop)] + "\n"


def test_bad_input_errors(scratch_t5, tiny_run, reversal, tmp_path, capsys):
    base = str(scratch_t5[0])
    proc = run_cli("finetune", "seq2seq", str(tiny_run), "--data", reversal[0], "--out", str(tmp_path / "x"),
                   "--device", "cpu")
    assert_clean_error(proc, "seq2seq fine-tuning needs an encoder-decoder")
    nocol = write_jsonl(tmp_path / "nocol.jsonl", [{"input": "a b", "output": "b a"}])
    proc = run_cli("finetune", "seq2seq", base, "--data", nocol, "--out", str(tmp_path / "y"), "--device", "cpu")
    assert_clean_error(proc, "no column 'target'")
    fails(capsys, "no column 'src'", "finetune", "seq2seq", base, "--data", reversal[0], "--input-column", "src",
          "--out", str(tmp_path / "z"), "--device", "cpu")
    for objective, arch in (("span", "gpt2"), ("denoise", "llama"), ("span", "bert"), ("seq2seq", "gpt2")):
        fails(capsys, f"--objective {objective} trains an encoder-decoder", "pretrain", "--objective", objective,
              "--arch", arch, "--data", reversal[0], "--out", str(tmp_path / "p"), "--max-steps", "1")
    fails(capsys, "--arch t5 is an encoder-decoder", "pretrain", "--arch", "t5", "--out", str(tmp_path / "p"),
          "--max-steps", "1")
    fails(capsys, "one file of input/target pairs", "evaluate", base, "--data", reversal[0], reversal[1])


def test_span_pretraining_resumes_exactly(corpus_dir, tmp_path):
    """Each example's noise comes from its own seed: interrupted and resumed == uninterrupted."""
    def cfg(out, **kw):
        return PretrainConfig(objective="span", data=[str(corpus_dir)], out=str(tmp_path / out), n_layer=1,
                              n_embd=32, context_length=32, max_steps=6, eval_every=3, eval_batches=1, batch_size=4,
                              save_every=2, vocab_size=384, device="cpu", tensorboard=False, **kw)

    pretrain(cfg("full"))
    state = pretrain(cfg("part"), on_step=lambda s: s == 3 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 3
    assert pretrain(cfg("part", resume=True))["step"] == 6
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_finetune_a_hugging_face_checkpoint(family, tmp_path, capsys):
    """A T5 / BART checkpoint directory fine-tunes as it is; on a batch of pairs, the task's loss is
    what transformers computes from the same `labels` (its own shift-right and start token)."""
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_seq2seq

    hf = tiny_seq2seq(family, tmp_path / "hf")
    lm = load(tmp_path / "hf", device="cpu")
    rows = [{"input": f"the {w} returns a list", "target": f"a {w}"} for w in ("value", "file", "key path", "module")]
    pairs, _ = encode_pairs(lm.tokenizer, [r["input"] for r in rows], [r["target"] for r in rows], 64)
    task = PairsTask(pairs, [], ([], []), lm.tokenizer, lm.config.decoder_start_token_id, 0, 4, 0, 0)
    batch = task.batch(0, 4)
    with torch.no_grad():
        ours = task.loss(lm.model, batch)[0]
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)

    data = write_jsonl(tmp_path / "pairs.jsonl", rows * 5)
    state = finetune_seq2seq(Seq2SeqConfig(base=str(tmp_path / "hf"), data=data, out=str(tmp_path / "ft"),
                                           max_steps=3, batch_size=4, eval_every=3, samples=0, device="cpu",
                                           tensorboard=False))
    assert state["step"] == 3 and "val_exact_match" in state["metrics"]
    assert main(["evaluate", str(tmp_path / "ft"), "--data", data, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 20
