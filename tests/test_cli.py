"""The `lmforge` command: main paths in subprocesses, bad input through the entry function."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import assert_clean_error, fails, run_cli

from lmforge.cli import build_parser, main
from lmforge.text.tokenizer import Tokenizer

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context-length", "16", "--batch-size", "4",
        "--vocab-size", "300", "--device", "cpu", "--eval-every", "5", "--eval-batches", "1"]


def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err




def test_every_verb_has_help(capsys):
    parser = build_parser()
    verbs = [a for a in parser._subparsers._group_actions[0].choices]
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert len(capsys.readouterr().out) > 200, verb
    for sub in ("train", "encode"):
        with pytest.raises(SystemExit):
            main(["tokenizer", sub, "--help"])
        assert "--" in capsys.readouterr().out


def test_pretrain_generate_evaluate_end_to_end(corpus_dir, tmp_path):
    out = tmp_path / "run"
    p = run_cli("pretrain", "--data", str(corpus_dir), "--out", str(out), "--max-steps", "10", *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["step"] == 10 and "val_loss" in summary
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.yaml", "metrics.jsonl",
                 "loss.png", "state/trainer.json"):
        assert (out / name).exists(), name
    g = run_cli("generate", str(out), "--prompt", "The new", "--max-new-tokens", "5", "--seed", "1",
                "--top-candidates", "3")
    assert g.returncode == 0, g.stderr
    assert g.stdout.count("<-") == 5 and "The new" in g.stdout
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The valid key reads a new socket. The first path yields a small list.")
    e = run_cli("evaluate", str(out), "--data", str(held_out))
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout)
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens"} and result["tokens"] > 5


def test_config_file_with_flag_overrides(corpus_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: [{corpus_dir}]\nout: {tmp_path / 'r'}\nmax_steps: 3\nn_layer: 1\nn_embd: 32\n"
                   "n-head: 2\ncontext_length: 16\nbatch_size: 4\nvocab_size: 300\ndevice: cpu\n")
    code, out, err = run_main(capsys, "pretrain", "--config", str(cfg), "--max-steps", "2")
    assert code == 0, err
    assert json.loads(out)["step"] == 2  # the flag beat the file
    # the saved config reproduces the run
    code, out, err = run_main(capsys, "pretrain", "--config", str(tmp_path / "r" / "train_config.yaml"),
                              "--out", str(tmp_path / "r2"))
    assert code == 0, err
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (tmp_path / "r2" / "model.safetensors").read_bytes()


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_steps: 3\nlearning_rate: 0.1\n")
    fails(capsys, "unknown config key(s) learning_rate", "pretrain", "--config", str(cfg))
    cfg.write_text("max_steps: many\n")
    fails(capsys, "expected int", "pretrain", "--config", str(cfg))


def test_missing_and_empty_data(tmp_path, capsys):
    out = tmp_path / "out"
    fails(capsys, "no such file", "pretrain", "--data", str(tmp_path / "missing"), "--out", str(out),
                "--max-steps", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    fails(capsys, "corpus is empty", "pretrain", "--data", str(empty), "--out", str(out), "--max-steps", "1")
    assert not out.exists()  # nothing half-written


def test_binary_and_invalid_utf8_files_are_survivable(corpus_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    (data / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (data / "latin1.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    p = run_cli("pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipping binary file" in p.stderr and "2 invalid UTF-8 sequence(s) replaced" in p.stderr
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.txt").write_bytes(b"\x00\x01\x02")
    assert_clean_error(run_cli("pretrain", "--data", str(only_binary), "--out", str(tmp_path / "r2"),
                               "--max-steps", "1"), "corpus is empty")


def test_resume_with_incompatible_config(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    fails(capsys, "incompatible config: batch_size=16", "pretrain", "--out", str(run), "--resume",
                "--batch-size", "16", "--max-steps", "200")
    fails(capsys, "incompatible config: n_layer=3", "pretrain", "--out", str(run), "--resume",
                "--n-layer", "3")


def test_existing_output_needs_resume_or_overwrite(tiny_run, capsys):
    fails(capsys, "already holds a model", "pretrain", "--out", str(tiny_run), "--max-steps", "1")


def test_tokenizer_that_does_not_match_the_model(tiny_run, tmp_path, capsys):
    run = tmp_path / "mismatch"
    shutil.copytree(tiny_run, run)
    bigger = Tokenizer.from_file(run / "tokenizer.json")
    bigger.hf.add_tokens([f"extra{i}" for i in range(500)])  # now larger than the embedding
    bigger.save(run / "tokenizer.json")
    fails(capsys, "do not belong together", "generate", str(run), "--prompt", "The")


def test_max_new_tokens_beyond_context(tiny_run, capsys):
    fails(capsys, "exceeds the model's context length", "generate", str(tiny_run), "--prompt", "The",
                "--max-new-tokens", "1000")


def test_not_a_model_directory(tmp_path, capsys):
    fails(capsys, "not a model directory", "generate", str(tmp_path), "--prompt", "x")
    fails(capsys, "no such model directory", "evaluate", str(tmp_path / "nope"), "--data", "pydocs")


def test_tokenizer_train_and_encode(corpus_dir, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    code, _, err = run_main(capsys, "tokenizer", "train", "--data", str(corpus_dir), "--out", str(tok),
                            "--vocab-size", "320")
    assert code == 0, err
    code, out, _ = run_main(capsys, "tokenizer", "encode", str(tok), "--text", "The new module", "--json")
    assert code == 0
    enc = json.loads(out)
    assert "".join(enc["tokens"]) == "The new module" and len(enc["ids"]) == len(enc["tokens"])


def test_stop_strings_understand_escapes():
    from lmforge.cli.verbs import unescape as _unescape

    assert _unescape(r"\n\n") == "\n\n" and _unescape(r"a\tb") == "a\tb" and _unescape(r"c:\\n") == "c:\\n"
    assert _unescape("café") == "café"


def test_long_prompts_are_refused_before_any_output_or_cut_from_the_left(tiny_run, capsys):
    long_prompt = "The valid key reads a new socket. " * 30
    code, out, err = run_main(capsys, "generate", str(tiny_run), "-p", long_prompt, "--max-new-tokens", "4")
    assert code == 2 and out == "" and "--truncate left" in err  # nothing echoed before the refusal
    code, out, err = run_main(capsys, "generate", str(tiny_run), "-p", long_prompt, "--max-new-tokens", "4",
                              "--truncate", "left", "--seed", "0")
    assert code == 0, err
    assert "cut" in err and "from its start" in err and out.startswith("…")


def test_top_candidates_show_the_picked_tokens_rank(tiny_run, capsys):
    code, out, err = run_main(capsys, "generate", str(tiny_run), "-p", "The new", "--max-new-tokens", "5",
                              "--top-candidates", "2", "--seed", "3", "--temperature", "1.5")
    assert code == 0, err
    lines = [line for line in out.splitlines() if "<-" in line]
    assert len(lines) == 5 and all(re.search(r"picked #\d+ \(\d+\.\d%\)$", line) for line in lines)


def test_tokenizer_encode_shows_partial_characters_as_bytes(tiny_run, capsys):
    code, out, _ = run_main(capsys, "tokenizer", "encode", str(tiny_run), "--text", "héllo 🙂\nx")
    assert code == 0
    assert "\ufffd" not in out and "<0xF0>" in out and "\\n" in out  # bytes shown, newline escaped


def test_exact_match_needs_a_decoder(tmp_path, capsys):
    records = tmp_path / "r.jsonl"
    records.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    fails(capsys, "exact match of generated answers needs a decoder", "evaluate", "minilm", "--data", str(records))
