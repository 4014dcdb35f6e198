"""Prompt templates: how a conversation becomes text, and which parts the model learns to write.

A template renders messages ({"role": system|user|assistant, "content": ...}) into segments
(text, trainable, markup). Trainable segments are the assistant's words and end-of-turn marker:
instruction tuning puts loss on them only. Markup segments may contain special tokens; message
content never does, so a user cannot forge a turn boundary by typing `<|im_end|>`.

An assistant message may carry its reasoning ("reasoning_content", or inline `<think>...</think>`
before the answer). A model template that reads reasoning_content (Qwen3's) decides where it shows,
typically only in the turns after the last user message; every other template shows it inline.
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
               tools: list[Tool] | None = None, variables: dict | None = None) -> list[Segment]:
        """Segments for `messages` (with the functions in `tools` offered, if any). Assistant tool
        calls are trainable like the words around them; tool results, like user turns, are not.
        A conversation read from a record may carry its tools on its first message ("tools").
        `variables` go to a model's Jinja template as they are (e.g. Qwen3's enable_thinking)."""
        if tools is None and messages and messages[0].get("tools"):  # OpenAI's shape, validated when read
            tools = parse_tools(messages[0]["tools"])
        messages = _reasoning_shaped(messages, self.takes_reasoning)
        if self.name != "jinja":
            tooled = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            if tooled and self.name != "chatml":
                raise LMForgeError(f"the {self.name} template cannot express tool calls; use chatml or a model "
                                   "whose chat template takes tools")
            return getattr(self, f"_render_{self.name}")(messages, tokenizer, add_generation_prompt, tools)
        return self._render_jinja(messages, tokenizer, add_generation_prompt, tools, variables)

    def text(self, messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False,
             variables: dict | None = None) -> str:
        """The whole conversation as the template writes it, every message included (what Hugging
        Face's apply_chat_template(tokenize=False) gives); `render` is for training spans."""
        if self.name == "jinja":
            messages = _reasoning_shaped(messages, self.takes_reasoning)
            return self._render_source(messages, tokenizer, add_generation_prompt, variables=variables)
        return "".join(piece for piece, *_ in self.render(messages, tokenizer, add_generation_prompt))

    @property
    def takes_reasoning(self) -> bool:
        """Whether the template places reasoning itself (reads reasoning_content, as Qwen3's does)."""
        return self.name == "jinja" and "reasoning_content" in self.source

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

    def _render_jinja(self, messages, tokenizer, gen, tools=None, variables=None) -> list[Segment]:
        """The model's own chat template. Trainable spans come from rendering the conversation
        turn by turn: the text each assistant message adds is what the model must learn. Within
        every span, message content is plain text and only the template's own text is markup.
        The turn-by-turn renderings leave `variables` out (Qwen3's enable_thinking=False would make
        every turn's generation prompt an empty think block); the whole conversation has them, and
        those renderings must line up with it."""
        keep = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id")
        msgs = [{**{k: v for k, v in m.items() if k in keep},
                 "content": user_text(m) if m["role"] == "user" else m["content"]} for m in messages]
        if tools or any(m.get("tool_calls") for m in msgs):
            self._check_tool_text(tools, msgs, tokenizer)
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if answers and not gen:  # without a generation prompt the conversation ends with its last answer
            msgs = msgs[:answers[-1] + 1]
        args = (tokenizer, [t.to_json() for t in tools] if tools else None, variables)
        segments = self._incremental(msgs, gen, *args)
        return segments if segments is not None else self._anchored(msgs, gen, *args)

    def _incremental(self, msgs, gen, tokenizer, fns, variables) -> list[Segment] | None:
        """Spans for templates whose rendering of a conversation extends that of its beginning; None
        for the others (Qwen3's: it drops earlier turns' reasoning once the user speaks again)."""
        segments: list[Segment] = []
        done: list[Piece] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._jinja(msgs[:i], tokenizer, True, fns)
            full = self._jinja(msgs[:i + 1], tokenizer, False, fns)
            if not (_text(prompt).startswith(_text(done)) and _text(full).startswith(_text(prompt))):
                return None
            segments += _segments(prompt, len(_text(done)), False) + _segments(full, len(_text(prompt)), True)
            done = full
        rest = self._jinja(msgs, tokenizer, gen, fns, variables) if (gen or not segments) else done
        if not _text(rest).startswith(_text(done)):
            return None
        return segments + _segments(rest, len(_text(done)), False)

    def _anchored(self, msgs, gen, tokenizer, fns, variables) -> list[Segment]:
        """Spans cut from one rendering of the whole conversation, for templates that render a turn
        differently once later turns follow. Each assistant turn starts after its generation prompt
        (found after the content before it) and ends with the text that closes it when it is last:
        right after its own content, or (content-free) at the template's end-of-turn marker."""
        full = self._jinja(msgs, tokenizer, gen, fns, variables)
        text = _text(full)
        owned, pos = [], 0  # (start, end, message) of each content piece
        for piece, owner in full:
            if owner >= 0:
                owned.append((pos, pos + len(piece), owner))
            pos += len(piece)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render_source(msgs[:i], tokenizer, False, fns)
            prompt = self._render_source(msgs[:i], tokenizer, True, fns)
            turn = self._jinja(msgs[:i + 1], tokenizer, False, fns)
            opener = prompt[len(before):]
            if not (opener and prompt.startswith(before)):
                raise _unaligned()
            own = [(a, b) for a, b, o in owned if o == i]
            low = max([spans[-1][1] if spans else 0] + [b for _, b, o in owned if o < i])
            high = min([a for a, _, o in owned if o > i], default=len(text))
            start = text.find(opener, low)
            if start < 0 or start + len(opener) > (own[0][0] if own else high):
                raise _unaligned()
            start += len(opener)
            close = _closing(turn, i, bool(own), opener, _end_markers(tokenizer))
            at = own[-1][1] if own else start
            end = text.find(close, at)
            if end < 0 or (own and end != at) or end + len(close) > high:
                raise _unaligned()
            spans.append((start, end + len(close)))
        return _marked(full, spans)

    def _jinja(self, messages: list[dict], tokenizer: Tokenizer, gen: bool, tools=None,
               variables=None) -> list[Piece]:
        """The rendered conversation as (text, owner) pieces: owner is the index of the message whose
        content or reasoning the text is, -1 for the template's own text.

        The template is rendered twice: with the real messages, and with each content (and
        reasoning) replaced by a placeholder. The placeholder rendering shows which text is the
        template's own; the content between it is found in the real rendering, which templates may
        have trimmed or cut (Llama 3 trims), so each span need only be part of its message.
        """
        real = self._render_source(messages, tokenizer, gen, tools, variables)
        fields = [(m, key) for m in messages for key in ("content", "reasoning_content")]
        # Empty content stays empty: templates test `if message.content`, and it hides nothing.
        marked = [{**m, **{key: _placeholder(2 * i + k) if m[key] else ""
                           for k, key in enumerate(("content", "reasoning_content")) if key in m}}
                  for i, m in enumerate(messages)]
        parts = _PLACEHOLDER.split(self._render_source(marked, tokenizer, gen, tools, variables))
        markup, order = parts[0::2], [int(i) for i in parts[1::2]]
        if not order:
            return [(real, -1)] if real else []
        pieces: list[Piece] = []
        if not real.startswith(markup[0]):
            raise _untraceable()
        pos = len(markup[0])
        pieces.append((markup[0], -1))
        for k, i in enumerate(order):
            after = markup[k + 1]
            last = k == len(order) - 1
            message, key = fields[i]
            end = _content_end(real, pos, after, message[key], last)
            pieces += [(real[pos:end], i // 2), (after, -1)]
            pos = end + len(after)
        if pos != len(real):
            raise _untraceable()
        return [p for p in pieces if p[0]]

    def _render_source(self, messages: list[dict], tokenizer: Tokenizer, gen: bool, tools=None,
                       variables: dict | None = None) -> str:
        from jinja2 import TemplateError

        special = {k: _token_text(tokenizer.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}  # unset: undefined (""), as in transformers
        try:
            return self._compiled.render({**(variables or {}), **special, "messages": messages,
                                          "add_generation_prompt": gen, "tools": tools})
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

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' tojson, which models were trained on: Jinja's own sorts keys and escapes <>&'
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])  # as transformers
        env.filters["tojson"] = tojson
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


Piece = tuple[str, int]  # (text, index of the message whose content it is; -1: the template's own text)
# Private-use characters: no template alters them, and they survive trim/strip/split.
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


def _placeholder(i: int) -> str:
    return f"\ue000{i}\ue001"


def _text(pieces: list[Piece]) -> str:
    return "".join(t for t, _ in pieces)


def _segments(pieces: list[Piece], start: int, trainable: bool) -> list[Segment]:
    """The pieces from character `start` on, as segments."""
    out, pos = [], 0
    for text, owner in pieces:
        if pos + len(text) > start:
            out.append((text[max(start - pos, 0):], trainable, owner < 0))
        pos += len(text)
    return out


def _marked(pieces: list[Piece], spans: list[tuple[int, int]]) -> list[Segment]:
    """The pieces as segments, trainable within the character `spans`."""
    out: list[Segment] = []
    pos = 0
    for text, owner in pieces:
        cuts = sorted({0, len(text)} | {b - pos for span in spans for b in span if pos < b < pos + len(text)})
        out += [(text[a:b], any(s <= pos + a < e for s, e in spans), owner < 0) for a, b in zip(cuts, cuts[1:])]
        pos += len(text)
    return out


def _closing(turn: list[Piece], i: int, has_content: bool, opener: str, markers: list[str]) -> str:
    """The text that closes message `i`, the last of `turn`: what follows its content, or, for a turn
    whose content the whole rendering does not show, its answer from its last end-of-turn marker on."""
    text = _text(turn)
    pos, ends = 0, -1
    for piece, owner in turn:
        pos += len(piece)
        ends = pos if owner == i else ends
    if has_content and ends >= 0:
        return text[ends:]
    answer = text[text.rfind(opener) + len(opener):] if opener in text else ""
    at = max(answer.rfind(m) for m in markers)
    if at < 0:
        raise _unaligned()
    return answer[at:]


def _end_markers(tokenizer: Tokenizer) -> list[str]:
    return [m for m in [_token_text(tokenizer.config.get("eos_token"))] + _END_OF_TURN if m]


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


def _unaligned() -> LMForgeError:
    return LMForgeError("the model's chat_template renders earlier turns differently once later ones follow, in a "
                        "way lmforge cannot line up, so the assistant's part cannot be isolated; use --template "
                        "chatml or alpaca")


def _untraceable() -> LMForgeError:
    return LMForgeError("the model's chat_template rewrites message content, so lmforge cannot tell the "
                        "content from the template's own markup; use --template chatml or alpaca")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _reasoning_shaped(messages: list[dict], takes_reasoning: bool) -> list[dict]:
    """Assistant reasoning in the shape the template reads. One that reads reasoning_content gets
    inline `<think>...</think>` split into it, the way Qwen3's template splits it (so the placeholder
    rendering, whose content has no `</think>`, takes the same branch); any other gets it inline."""
    out = []
    for m in messages:
        reasoning, content = m.get("reasoning_content"), m.get("content") or ""
        if m["role"] == "assistant" and takes_reasoning and reasoning is None and "</think>" in content:
            head, _, tail = content.partition("</think>")
            m = {**m, "reasoning_content": head.rstrip("\n").split("<think>")[-1].lstrip("\n"),
                 "content": tail.split("</think>")[-1].lstrip("\n")}
        elif m["role"] == "assistant" and not takes_reasoning and reasoning is not None:
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            if reasoning:  # laid out as Qwen3 lays it out
                m["content"] = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        out.append(m)
    return out


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
