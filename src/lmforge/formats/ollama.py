"""An Ollama Modelfile beside an exported GGUF file: `lmforge export --format gguf --ollama`.

    FROM ./model.gguf
    TEMPLATE <the chat template in Ollama's Go-template syntax, in triple quotes>
    PARAMETER stop "<|im_end|>"

Ollama (and LM Studio's Modelfile import) format a conversation with a Go `text/template`, not
Jinja. Jinja templates are programs, so no general translation exists; but most chat templates
lay each message out the same way: a fixed text before and after its content, chosen by its role.
That layout is read off the model's own template by rendering probe conversations through it,
and written out as one `range` over `.Messages`. The result is checked before anything is
written: composed from the layout, several conversations (with and without a system message, one
to three turns) must render exactly as the model's template renders them. A template that does
something else (Llama 2 folds the system message into the first user turn) gets a one-line error
rather than a Modelfile that formats conversations differently from training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.errors import LMForgeError
from ..text.templates import Template
from ..text.tokenizer import Tokenizer
from .gguf_vocab import leading_bos

MARK = "\u2063{}\u2063"  # probe contents: invisible separators no template writes


@dataclass
class Layout:
    """Per role, the text before and after a message's content; the text before the first message;
    and the text that opens the reply (the generation prompt)."""

    head: str
    roles: dict[str, tuple[str, str]]
    reply: str

    def compose(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.head + "".join(self.roles[m["role"]][0] + m["content"] + self.roles[m["role"]][1]
                                   for m in messages)
        return text + (self.reply if add_generation_prompt else "")

    def go_template(self) -> str:
        """The layout as an Ollama TEMPLATE (Go text/template over .Messages)."""
        branches = "{{ else if ".join(f'eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
                                      for role, (pre, post) in self.roles.items())
        return f"{self.head}{{{{ range .Messages }}}}{{{{ if {branches}{{{{ end }}}}{{{{ end }}}}{self.reply}"


def _between(text: str, start: str, end: str | None) -> str:
    i = text.index(start) + len(start)
    return text[i:text.index(end, i)] if end else text[i:]


def read_layout(template: Template, tokenizer: Tokenizer) -> Layout:
    """The per-message layout of `template`, checked against its own renderings (or a one-line error)."""
    def text(messages: list[dict], gen: bool = False) -> str:
        return template.text(messages, tokenizer, gen)

    s, u1, a1, u2, a2 = (MARK.format(k) for k in "SUAVB")
    conv = [{"role": "system", "content": s}, {"role": "user", "content": u1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    try:
        full = text(conv)
        asst_post = _between(full, a2, None)
        user_pre = _between(full, a1, u2)[len(asst_post):]
        upto_user = text(conv[:4])
        user_post = _between(upto_user, u2, None)
        asst_pre = _between(full, u2, a2)[len(user_post):]
        reply = text(conv[:4], gen=True)[len(upto_user):]
        no_system = text(conv[1:3])
        head = no_system[:no_system.index(u1) - len(user_pre)]
        sys_pre = full[len(head):full.index(s)]
        sys_post = _between(full, s, u1)[:-len(user_pre) or None]
        layout = Layout(head, {"system": (sys_pre, sys_post), "user": (user_pre, user_post),
                               "assistant": (asst_pre, asst_post)}, reply)
        checks = [(conv, False), (conv[:4], True), (conv[1:], False), (conv[1:4], True), (conv[1:2], True),
                  (conv[:2], True)]
        same = all(layout.compose(c, g) == text(c, g) for c, g in checks)
    except (ValueError, LMForgeError):  # a mark missing from a rendering, or a template that refuses the probe
        same = False
    if not same:
        raise LMForgeError("this model's chat template does not lay out each message by its role alone (e.g. it "
                           "folds the system message into the first user turn), so it has no faithful Ollama "
                           "TEMPLATE; export without --ollama and write the TEMPLATE by hand")
    return layout


def modelfile(gguf_name: str, template: Template, tokenizer: Tokenizer, stop_ids: list[int]) -> str:
    """The Modelfile text: FROM the GGUF file beside it, the TEMPLATE, and one stop parameter per stop token
    (the model's own, and the special token that closes an assistant turn in its template)."""
    layout = read_layout(template, tokenizer)
    bos_id = leading_bos(tokenizer)
    bos = None if bos_id is None else tokenizer.id_to_token(bos_id)
    if bos and layout.head.startswith(bos):  # llama.cpp adds the BOS itself (add_bos_token): not twice
        layout.head = layout.head[len(bos):]
    fixed = [layout.head, layout.reply, *(t for pair in layout.roles.values() for t in pair)]
    if any("{{" in t for t in fixed):
        raise LMForgeError("the chat template writes '{{', which Ollama's Go template would read as an action")
    go = layout.go_template()
    if '"""' in go:
        raise LMForgeError('the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    specials = [t for t in (tokenizer.id_to_token(i) for i in tokenizer.special_ids) if t]
    closing = [t for t in specials if layout.roles["assistant"][1].startswith(t)]
    stops = sorted({t for t in (tokenizer.id_to_token(i) for i in stop_ids) if t} | set(closing[:1]))
    lines = ["# Written by lmforge export --ollama. Use it with:  ollama create NAME -f Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    lines += [f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in stops]
    return "\n".join(lines) + "\n"
