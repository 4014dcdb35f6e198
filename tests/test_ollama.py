"""`lmforge export --format gguf --ollama`: the Modelfile's TEMPLATE, rendered with Go's text/template
semantics (a small renderer below; Ollama itself cannot be installed here), formats conversations exactly
as the model's own chat template does."""

from __future__ import annotations

import json
import re

import pytest
from helpers import fails
from hf_fixtures import llama3_style
from test_gguf import ARCHS, make_dir

from lmforge.cli import main
from lmforge.text.tokenizer import Tokenizer

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end_of_text|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Llama 2 folds the system message into the first user turn: no per-message layout
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
          "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
          "{{ (sys if loop.first else '') + m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
          "{% endif %}{% endfor %}")


def go_render(template: str, data: dict) -> str:
    """Go text/template, the subset Ollama templates use: text, {{ .Field }}, {{ range .Messages }},
    {{ if .Field }} / {{ if eq .Field "x" }} with {{ else if ... }} / {{ else }}, {{ end }}, and the
    {{- / -}} whitespace trims."""
    parts = re.split(r"(\{\{-?\s.*?\s-?\}\}|\{\{[^-\s].*?\}\})", template, flags=re.S)
    for i in range(1, len(parts), 2):  # trims: {{- eats the white space before, -}} the white space after
        if parts[i].startswith("{{- "):
            parts[i - 1] = parts[i - 1].rstrip()
        if parts[i].endswith(" -}}"):
            parts[i + 1] = parts[i + 1].lstrip()
    actions = [p.strip("{}-").strip() if i % 2 else p for i, p in enumerate(parts)]
    pos = 0

    def value(expr: str, scope: dict):
        if expr.startswith("eq "):
            left, right = expr[3:].split(" ", 1)
            return value(left, scope) == json.loads(right)
        assert expr.startswith("."), expr
        return scope.get(expr[1:], data.get(expr[1:]))

    def block(scope: dict, run: bool) -> tuple[str, str]:
        """Render until an unmatched else/end; returns (text, the action that stopped it)."""
        nonlocal pos
        out = []
        while pos < len(actions):
            piece, is_action = actions[pos], pos % 2 == 1
            pos += 1
            if not is_action:
                out.append(piece if run else "")
            elif piece == "end" or piece.startswith("else"):
                return "".join(out), piece
            elif piece.startswith("range "):
                start, items = pos, value(piece[6:], scope) if run else []
                for item in items or [None]:
                    pos = start
                    text, stop = block(item or {}, run and item is not None)
                    out.append(text)
                assert stop == "end"
            elif piece.startswith("if "):
                taken, cond = False, piece[3:]
                while True:
                    hit = run and not taken and bool(value(cond, scope)) if cond is not None else run and not taken
                    text, stop = block(scope, hit)
                    out.append(text)
                    taken = taken or hit
                    if stop == "end":
                        break
                    cond = stop[8:] if stop.startswith("else if ") else None
            else:
                out.append(str(value(piece, scope)) if run else "")
        return "".join(out), ""

    text, stop = block({}, True)
    assert stop == "", f"unbalanced template: {stop}"
    return text


def test_go_renderer_follows_go_semantics():
    t = 'A{{ range .Messages }}{{ if eq .Role "user" }}[{{ .Content }}]{{ else if eq .Role "x" }}X{{ else }}?' \
        '{{ end }}{{ end }}  \n{{- .End }}'  # {{- trims the white space before it
    assert go_render(t, {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "x"}, {"Role": "z"}],
                         "End": "!"}) == "A[hi]X?!"


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  spaces and\nnewlines  "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e {{ not a template }}"}],
]


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M).group(1)


@pytest.mark.parametrize("source", ["chatml", LLAMA3, ZEPHYR])
def test_modelfile_renders_as_the_model_does(source, tmp_path, capsys):
    from lmforge.formats.load import load_model
    from lmforge.text.templates import template_from_json

    tok = Tokenizer(llama3_style(), {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}) \
        if source != "chatml" else None
    src = make_dir(tmp_path / "m", tok, **ARCHS["llama"])
    meta = json.loads((src / "config.json").read_text())
    chat = {"name": "chatml"} if source == "chatml" else {"name": "jinja", "source": source}
    stops = [] if source == "chatml" else [load_model(src, device="cpu").tokenizer.token_id("<|eot_id|>")]
    (src / "config.json").write_text(json.dumps({**meta, "chat_template": chat, "stop_token_ids": stops}))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    main(["export", str(src), "--format", "gguf", "--ollama", "--out", str(out)])
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in text
    lm = load_model(src, device="cpu")
    template = template_from_json(chat, lm.tokenizer)
    for conv in CONVERSATIONS:
        want = template.text(conv, lm.tokenizer, True)
        if lm.tokenizer.encode("a", add_special_tokens=True)[0] in lm.tokenizer.special_ids:
            want = want.removeprefix("<|begin_of_text|>")  # llama.cpp adds the BOS itself, as the tokenizer does
        got = go_render(modelfile_template(text),
                        {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]})
        assert got == want, (got, want)
    want_stops = ["<|im_end|>", "<|endoftext|>"] if source == "chatml" else ["<|end_of_text|>", "<|eot_id|>"]
    for stop in want_stops:
        assert f"PARAMETER stop {json.dumps(stop)}" in text
    assert "ollama create" in capsys.readouterr().err


def test_template_without_a_per_message_layout_is_refused(tmp_path, capsys):
    src = make_dir(tmp_path / "m", Tokenizer(llama3_style()), **ARCHS["llama"])
    meta = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**meta, "chat_template": {"name": "jinja", "source": LLAMA2}}))
    fails(capsys, "folds the system message", "export", str(src), "--format", "gguf", "--ollama", "--out",
          str(tmp_path / "m.gguf"))
    assert not list(tmp_path.glob("*.gguf*")) and not (tmp_path / "Modelfile").exists()  # nothing written
    braces = ("{% for m in messages %}{{ '{{' }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}{{ '{{' }}assistant: {% endif %}")
    (src / "config.json").write_text(json.dumps({**meta, "chat_template": {"name": "jinja", "source": braces}}))
    fails(capsys, "writes '{{', which Ollama's Go template would read as an action", "export", str(src), "--format",
          "gguf", "--ollama", "--out", str(tmp_path / "m.gguf"))
    assert not list(tmp_path.glob("*.gguf*"))
