"""Prompt templates: how a conversation becomes text, and which parts the model learns to write.

A template renders messages ({"role": system|user|assistant, "content": ...}) into segments
(text, trainable, markup). Trainable segments are the assistant's words and end-of-turn marker:
instruction tuning puts loss on them only. Markup segments may contain special tokens; message
content never does, so a user cannot forge a turn boundary by typing `<|im_end|>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

from ..core.errors import LMForgeError
from .tokenizer import Tokenizer
from .toolcalls import HERMES, NATIVE, Markers, Tool, normalize_messages, parse_tools, tools_prompt

Segment = tuple[str, bool, bool]  # (text, trainable, markup)
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")
_END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"]


def user_text(message: dict) -> str:
    """A user message's text; an Alpaca-style `input` is appended to the instruction."""
    extra = message.get("input") or ""
    return message["content"] + (f"\n\n{extra}" if extra else "")


@dataclass
class Template:
    name: str
    source: str = ""  # the Jinja text, for name == "jinja"

    # -- rendering ------------------------------------------------------------------------------
    def render(self, messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False,
               tools: list[Tool] | None = None) -> list[Segment]:
        """Segments for `messages` (with the functions in `tools` offered, if any). Assistant tool
        calls are trainable like the words around them; tool results, like user turns, are not.
        A conversation read from a record may carry its tools on its first message ("tools")."""
        if tools is None and messages and messages[0].get("tools"):  # OpenAI's shape, validated when read
            tools = parse_tools(messages[0]["tools"])
        if self.name != "jinja":
            tooled = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            if tooled and self.name != "chatml":
                raise LMForgeError(f"the {self.name} template cannot express tool calls; use chatml or a model "
                                   "whose chat template takes tools")
            return getattr(self, f"_render_{self.name}")(messages, tokenizer, add_generation_prompt, tools)
        return self._render_jinja(messages, tokenizer, add_generation_prompt, tools)

    def text(self, messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False) -> str:
        """The whole conversation as the template writes it, every message included (what Hugging
        Face's apply_chat_template(tokenize=False) gives); `render` is for training spans."""
        if self.name == "jinja":
            return self._render_source(messages, tokenizer, add_generation_prompt)
        return "".join(piece for piece, *_ in self.render(messages, tokenizer, add_generation_prompt))

    def tool_markers(self) -> Markers | None:
        """How this template's model writes a tool call (None: it cannot)."""
        if self.name == "chatml":
            return NATIVE
        if self.name == "jinja" and "tools" in self.source and HERMES.open in self.source:
            return HERMES
        return None

    def _render_alpaca(self, messages, tokenizer, gen, tools=None) -> list[Segment]:
        eot = tokenizer.id_to_token(tokenizer.eot_id)
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        segments: list[Segment] = []
        first = True
        for m in messages:
            if m["role"] == "user":
                preamble = system or (ALPACA_PREAMBLE_INPUT if m.get("input") else ALPACA_PREAMBLE)
                text = (f"{preamble}\n\n" if first else "\n\n") + f"### Instruction:\n{m['content']}\n\n"
                if m.get("input"):
                    text += f"### Input:\n{m['input']}\n\n"
                segments.append((text + "### Response:\n", False, False))
                first = False
            elif m["role"] == "assistant":
                segments += [(m["content"], True, False), (eot, True, True)]
        return segments

    def _render_chatml(self, messages, tokenizer, gen, tools=None) -> list[Segment]:
        segments: list[Segment] = []
        if tools:  # the functions go in the system message, after its own text
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
            messages = messages[1:] if messages and messages[0]["role"] == "system" else messages
            segments += [("<|im_start|>system\n", False, True),
                         ((system + "\n\n" if system else "") + tools_prompt(tools), False, False),
                         ("<|im_end|>\n", False, True)]
        for m in messages:
            if m["role"] == "assistant":
                segments += [("<|im_start|>assistant\n", False, True), (m["content"], True, False)]
                for c in m.get("tool_calls") or []:  # the JSON is plain text between special tokens
                    call = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                    segments += [(NATIVE.open, True, True), (json.dumps(call, ensure_ascii=False), True, False),
                                 (NATIVE.close, True, True)]
                segments += [("<|im_end|>", True, True), ("\n", False, False)]
            elif m["role"] == "tool":  # untrusted: plain text fenced by special tokens it cannot forge
                segments += [("<|im_start|>tool\n<|tool_result|>", False, True), (m["content"], False, False),
                             ("<|/tool_result|><|im_end|>\n", False, True)]
            else:
                content = user_text(m) if m["role"] == "user" else m["content"]
                segments += [(f"<|im_start|>{m['role']}\n", False, True), (content, False, False),
                             ("<|im_end|>\n", False, True)]
        if gen:
            segments.append(("<|im_start|>assistant\n", False, True))
        return segments

    def _render_jinja(self, messages, tokenizer, gen, tools=None) -> list[Segment]:
        """The model's own chat template. Trainable spans come from rendering the conversation
        turn by turn: the text each assistant message adds is what the model must learn. Within
        every span, message content is plain text and only the template's own text is markup."""
        msgs = [{**{k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id")},
                 "content": user_text(m) if m["role"] == "user" else m["content"]} for m in messages]
        if tools or any(m.get("tool_calls") for m in msgs):
            self._check_tool_text(tools, msgs, tokenizer)
        fns = [t.to_json() for t in tools] if tools else None
        segments: list[Segment] = []
        done: list[Piece] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._jinja(msgs[:i], tokenizer, True, fns)
            full = self._jinja(msgs[:i + 1], tokenizer, False, fns)
            if not (_text(prompt).startswith(_text(done)) and _text(full).startswith(_text(prompt))):
                raise LMForgeError("the model's chat_template does not render conversations incrementally, so "
                                   "the assistant's part cannot be isolated; use --template chatml or alpaca")
            segments += [(t, False, not c) for t, c in _cut(prompt, len(_text(done)))]
            segments += [(t, True, not c) for t, c in _cut(full, len(_text(prompt)))]
            done = full
        rest = self._jinja(msgs, tokenizer, gen, fns) if (gen or not segments) else done
        segments += [(t, False, not c) for t, c in _cut(rest, len(_text(done)))]
        return segments

    def _jinja(self, messages: list[dict], tokenizer: Tokenizer, gen: bool, tools=None) -> list[Piece]:
        """The rendered conversation as (text, is_content) pieces.

        The template is rendered twice: with the real messages, and with each content replaced by a
        placeholder. The placeholder rendering shows which text is the template's own; the content
        between it is found in the real rendering, which templates may have trimmed or cut (Llama 3
        trims, Qwen3 drops past reasoning), so each span need only be part of its message.
        """
        real = self._render_source(messages, tokenizer, gen, tools)
        # Empty content stays empty: templates test `if message.content`, and it hides nothing.
        marked = [{**m, "content": _placeholder(i) if m["content"] else ""} for i, m in enumerate(messages)]
        parts = _PLACEHOLDER.split(self._render_source(marked, tokenizer, gen, tools))
        markup, order = parts[0::2], [int(i) for i in parts[1::2]]
        if not order:
            return [(real, False)] if real else []
        pieces: list[Piece] = []
        if not real.startswith(markup[0]):
            raise _untraceable()
        pos = len(markup[0])
        pieces.append((markup[0], False))
        for k, i in enumerate(order):
            after = markup[k + 1]
            last = k == len(order) - 1
            end = _content_end(real, pos, after, messages[i]["content"], last)
            pieces += [(real[pos:end], True), (after, False)]
            pos = end + len(after)
        if pos != len(real):
            raise _untraceable()
        return [p for p in pieces if p[0]]

    def _render_source(self, messages: list[dict], tokenizer: Tokenizer, gen: bool, tools=None) -> str:
        from jinja2 import TemplateError

        special = {k: _token_text(tokenizer.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}  # unset: undefined (""), as in transformers
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=gen, tools=tools, **special)
        except TemplateError as e:
            raise LMForgeError(f"chat template failed to render: {e}") from None

    def _check_tool_text(self, tools, msgs, tokenizer) -> None:
        """Tool definitions and call arguments are rendered as the template's own text (markup), so
        they must not spell a special token: a forged `<|im_end|>` would end the turn."""
        if self.tool_markers() is None and tools:
            raise LMForgeError("this model's chat template does not take tools (no Hermes-style <tool_call> "
                               "format); use --template chatml")
        text = json.dumps([t.to_json() for t in tools or []]) + json.dumps([m.get("tool_calls") for m in msgs])
        forged = next((t for t in tokenizer.special_tokens() if t in text), None)
        if forged:
            raise LMForgeError(f"tool definitions and call arguments may not contain the special token {forged}")

    @cached_property
    def _compiled(self):
        """The Jinja template, compiled once (every record, turn and sample renders it several times)."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise LMForgeError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise LMForgeError(f"chat template failed to compile: {e}") from None

    # -- properties -----------------------------------------------------------------------------
    def stop_tokens(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids that end an assistant turn."""
        names = {"alpaca": [], "chatml": ["<|im_end|>"]}.get(self.name)
        if names is None:  # jinja: the tokenizer's EOS and any end-of-turn marker it knows
            names = [_token_text(tokenizer.config.get("eos_token"))] + _END_OF_TURN
        ids = {tokenizer.eot_id}
        ids.update(i for i in (tokenizer.token_id(n) for n in names if n) if i is not None)
        return sorted(ids)

    def check(self, tokenizer: Tokenizer) -> None:
        if self.name == "chatml":
            missing = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_id(t) is None]
            if missing:
                raise LMForgeError(f"the chatml template needs the special tokens {', '.join(missing)}, which "
                                   "this tokenizer cannot express; use --template alpaca (or the model's own)")
        if self.name == "jinja" and not self.source:
            raise LMForgeError("this model's tokenizer has no chat_template; use --template chatml or alpaca")

    def to_json(self) -> dict:
        return {"name": self.name, **({"source": self.source} if self.source else {})}


Piece = tuple[str, bool]  # (text, is message content)
# Private-use characters: no template alters them, and they survive trim/strip/split.
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


def _placeholder(i: int) -> str:
    return f"\ue000{i}\ue001"


def _text(pieces: list[Piece]) -> str:
    return "".join(t for t, _ in pieces)


def _cut(pieces: list[Piece], start: int) -> list[Piece]:
    """The pieces from character `start` on."""
    out, pos = [], 0
    for text, content in pieces:
        if pos + len(text) > start:
            out.append((text[max(start - pos, 0):], content))
        pos += len(text)
    return out


def _content_end(real: str, pos: int, after: str, content: str, last: bool) -> int:
    """Where a message's rendered content, starting at `pos` in `real`, ends: the longest span that
    is part of the message and is followed by the template's next text. Longest, because content
    that imitates the template (a forged `<|im_end|>`) also matches a shorter span."""
    if last:
        end = len(real) - len(after)
        if end >= pos and real.endswith(after) and real[pos:end] in content:
            return end
        raise _untraceable()
    best, j = -1, real.find(after, pos)
    while j >= 0 and j - pos <= len(content):
        if real[pos:j] in content:
            best = j
        j = real.find(after, j + 1)
    if best < 0:
        raise _untraceable()
    return best


def _untraceable() -> LMForgeError:
    return LMForgeError("the model's chat_template rewrites message content, so lmforge cannot tell the "
                        "content from the template's own markup; use --template chatml or alpaca")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def get_template(name: str, tokenizer: Tokenizer) -> Template:
    """alpaca, chatml, model (the tokenizer's own chat_template), or auto: the model's own if it
    has one, else chatml if the tokenizer has its tokens, else alpaca."""
    source = tokenizer.config.get("chat_template") or ""
    if isinstance(source, list):  # some tokenizers ship several named templates
        source = next((t["template"] for t in source if t.get("name") == "default"), source[0]["template"])
    if name == "auto":
        if source:
            name = "model"
        elif all(tokenizer.token_id(t) is not None for t in ("<|im_start|>", "<|im_end|>")):
            name = "chatml"
        else:
            name = "alpaca"
    if name not in ("alpaca", "chatml", "model"):
        raise LMForgeError(f"unknown template {name!r} (choose auto, alpaca, chatml or model)")
    template = Template("jinja", source) if name == "model" else Template(name)
    template.check(tokenizer)
    return template


def template_from_json(data: dict | None, tokenizer: Tokenizer) -> Template:
    if not data:
        return get_template("auto", tokenizer)
    return Template(data["name"], data.get("source", ""))


def encode_segments(tokenizer: Tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is trainable."""
    ids: list[int] = []
    trainable: list[bool] = []
    for text, train, markup in segments:
        if not text:
            continue
        piece = tokenizer.encode(text, special=markup)
        ids += piece
        trainable += [train] * len(piece)
    return ids, trainable


def validate_messages(messages, where: str) -> list[dict]:
    """A record's conversation in the shape templates render (OpenAI's, tool calls included)."""
    return normalize_messages(messages, f"{where}: messages")
