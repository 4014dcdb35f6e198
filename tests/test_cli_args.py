"""Argument handling shared by every verb: bounds on numbers, positionals anywhere, help, speed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
from helpers import fails

from lmforge.cli import VERBS, _dataclass, main
from lmforge.core.config import _base_type

UNBOUNDED = {"seed"}  # any integer is a valid seed


def bounded_fields():
    """(verb, field, bounds) for every numeric flag of every verb."""
    for verb, (spec, _, _) in VERBS.items():
        cls = _dataclass(spec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _base_type(hints[f.name])
            if tp in (int, float) and f.metadata.get("cli", True):
                yield verb, f, f.metadata.get("bounds") or {}


def test_every_numeric_flag_is_bounded():
    unbounded = [f"{verb} --{f.name}" for verb, f, bounds in bounded_fields() if not bounds and f.name not in UNBOUNDED]
    assert not unbounded, f"numeric flags without bounds: {unbounded}"


def violations():
    """(verb, field, bad value as typed) for every bound of every numeric flag, and inf for floats."""
    for verb, f, bounds in bounded_fields():
        is_int = _base_type(typing.get_type_hints(_dataclass(VERBS[verb][0]))[f.name])[0] is int
        for kind, b in bounds.items():
            bad = {"ge": b - (1 if is_int else 0.5), "gt": b, "le": b + 1, "lt": b}[kind]
            yield verb, f, str(int(bad)) if is_int else str(bad)
        if not is_int:
            yield verb, f, "inf"


@pytest.mark.parametrize("verb,field,value", [pytest.param(v, f, x, id=f"{v}--{f.name}={x}")
                                              for v, f, x in violations()])
def test_out_of_range_numbers_give_one_line_errors(verb, field, value, capsys, tmp_path):
    cls = _dataclass(VERBS[verb][0])
    positionals = [str(tmp_path / f.name) for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    flag = "--" + field.name.replace("_", "-")
    fails(capsys, f"{flag} must be", *verb.split(), *positionals, flag, value)


def test_absurd_values_named_in_the_issue(capsys, tiny_run, tmp_path):
    for args, message in [
        (["generate", str(tiny_run), "-p", "a", "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", str(tiny_run), "-p", "a", "--top-p", "1.5"], "--top-p must be > 0 and <= 1"),
        (["generate", str(tiny_run), "-p", "a", "--top-k", "-3"], "--top-k must be >= 1"),
        (["generate", str(tiny_run), "-p", "a", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
        (["generate", str(tiny_run), "-p", "a", "-n", "0"], "--num-samples must be >= 1"),
        (["generate", str(tiny_run), "-p", "a", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["evaluate", str(tiny_run), "--data", "pydocs", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["pretrain", "--data", "pydocs", "--out", str(tmp_path / "x"), "--max-steps", "-5"], "--max-steps must be"),
        (["pretrain", "--data", "pydocs", "--out", str(tmp_path / "x"), "--max-steps", "5", "--n-head", "0"],
         "--n-head must be"),
    ]:
        fails(capsys, message, *args)
    assert not (tmp_path / "x").exists()


def test_positionals_are_recognised_after_list_flags(tiny_run, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The valid key reads a new socket. The first path yields a small list.")
    assert main(["evaluate", "--data", str(held_out), str(tiny_run)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(tiny_run), "--data", str(held_out)]) == 0
    assert json.loads(capsys.readouterr().out) == after
    fails(capsys, "missing required argument(s): MODEL_DIR", "evaluate", "--data", str(held_out))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().startswith("lmforge 0.")


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys\nfrom lmforge.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['generate', 'x', '--top-p', '2'],\n"
            "             ['embed', '--help'], ['pretrain', '--help'], ['pretrain', '--max-steps', '0'],\n"
            "             ['finetune', 'instruct', 'x', '--lora-rank', '-1']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"


def test_help_shows_zero_defaults_and_each_verbs_own_examples(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "classify", "--help"])
    out = capsys.readouterr().out
    assert "lmforge finetune classify runs/demo" in out and "lmforge classify runs/spam" not in out
    assert "LoRA rank; 0 = full fine-tuning of every (unfrozen) weight (default: 0)" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "dropout probability (default: 0.0)" in " ".join(capsys.readouterr().out.split())


def test_flag_errors_are_one_line_with_the_closest_flag(capsys):
    """A mistyped flag or choice: one `error:` line naming the verb and the nearest spelling, exit 2, no usage."""
    from helpers import fails

    line = fails(capsys, "unrecognised argument '--temprature' (did you mean --temperature?)",
                 "generate", "runs/x", "--temprature", "0.5")
    assert line.startswith("error: lmforge generate:")
    fails(capsys, "(did you mean --lora-rank?)", "finetune", "instruct", "runs/x", "--lora-rnk", "8")
    fails(capsys, "unrecognised argument '--zzzz' (see lmforge generate --help)", "generate", "runs/x", "--zzzz")
    fails(capsys, "invalid choice: 'q4_k' (choose from 'f32', 'f16', 'q8_0', 'q4_0') (did you mean 'q4_0'?)",
          "export", "runs/x", "--outtype", "q4_k")
    fails(capsys, "invalid choice: 'generat'", "generat", "runs/x")
    assert main(["generate", "runs/x", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and len(err.strip().splitlines()) == 1, err


def test_pretrain_and_tokenizer_train_share_the_vocabulary_bound(tmp_path, capsys):
    """Every byte and every special token: `pretrain --vocab-size 3` is refused as `tokenizer train` refuses it
    (it used to train silently with 320 tokens)."""
    from helpers import fails

    for argv in (["pretrain", "--data", "pydocs", "--out", str(tmp_path / "p")],
                 ["tokenizer", "train", "--data", "pydocs", "--out", str(tmp_path / "t")]):
        fails(capsys, "--vocab-size must be >= 272 (got 3)", *argv, "--vocab-size", "3")
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()
