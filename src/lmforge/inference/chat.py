"""`lmforge chat`: a multi-turn conversation in the terminal, streamed, in the model's own format."""

from __future__ import annotations

import sys
from typing import TextIO

from ..core.errors import LMForgeError
from ..formats.load import Loaded
from ..text.templates import encode_segments, template_from_json
from ..text.toolcalls import call_grammar, closed, normalize_messages, parse_tool_choice, parse_tools, split_calls
from .generate import generate_text
from .grammar import Compiler, Grammar, json_schema_grammar, lark_grammar, regex_grammar
from .prefix_cache import PrefixCache
from .sampling import validate_sampling

HELP = "commands: /reset (forget the conversation), /exit (quit)"


def chat_setup(lm: Loaded):
    """The model's chat template (or its training template) and the ids that end an assistant turn."""
    template = template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
    template.check(lm.tokenizer)
    return template, set(template.stop_tokens(lm.tokenizer)) | lm.stop_ids()


def chat_ids(lm: Loaded, template, messages: list[dict], tools: list | None = None) -> list[int]:
    """Prompt ids for `messages` (offering `tools`, if any), ending where the assistant's answer begins."""
    ids, _ = encode_segments(lm.tokenizer, template.render(messages, lm.tokenizer, add_generation_prompt=True,
                                                           tools=tools))
    return ids


def grammar_for(lm: Loaded, json_schema: dict | None = None, regex: str | None = None,
                lark: str | None = None) -> Grammar | None:
    """One of a JSON schema (its objects closed), a regex or a Lark grammar, compiled for `lm` and
    cached on it; None when none is given."""
    given = [g for g in (json_schema, regex, lark) if g is not None]
    if len(given) > 1:
        raise LMForgeError("give one of json_schema, regex and lark")
    if not given:
        return None
    if getattr(lm, "_grammars", None) is None:
        stop = set(lm.stop_ids()) | (set(chat_setup(lm)[1]) if lm.kind.generates else set())
        lm._grammars = Compiler(lm.tokenizer, lm.config.vocab_size, sorted(stop))
    text = (json_schema_grammar(closed(json_schema)) if json_schema is not None
            else regex_grammar(regex) if regex is not None else lark_grammar(lark))
    return lm._grammars.compile(text)


def reply(lm: Loaded, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: object = None,
          parallel_tool_calls: bool = True, json_schema: dict | None = None, max_new_tokens: int = 256,
          temperature: float = 0.7, **sampling) -> dict:
    """The assistant's reply to OpenAI-format `messages` as OpenAI's message object (with
    "tool_calls" when it called any of `tools`): what `lmforge serve` answers, without a server."""
    template, stop = chat_setup(lm)
    fns = parse_tools(tools) if tools else []
    choice = parse_tool_choice(tool_choice, fns)
    markers = template.tool_markers() if choice != "none" else None
    if choice != "none" and markers is None:
        raise LMForgeError(f"this model's {template.name} chat template cannot express tool calls")
    if markers is not None:
        answer = closed(json_schema) if json_schema is not None else None
        grammar = grammar_for(lm, lark=call_grammar(fns, choice, parallel_tool_calls, markers, lm.tokenizer, answer))
    else:
        grammar = grammar_for(lm, json_schema=json_schema)
    ids = chat_ids(lm, template, normalize_messages(messages), fns if markers else None)
    room = lm.config.context_length - len(ids)
    if room < 1:
        raise LMForgeError(f"the conversation is {len(ids)} tokens; the model's context is {lm.config.context_length}")
    text = generate_text(lm.model, lm.tokenizer, "", prompt_ids=ids, max_new_tokens=min(max_new_tokens, room),
                         temperature=temperature, stop_ids=stop, grammar=grammar, **sampling)
    content, calls = split_calls(text, markers, fns) if markers is not None else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content or None, "tool_calls": [c.to_json() for c in calls]}


def fit_history(lm: Loaded, template, history: list[dict], reserve: int) -> list[int]:
    """Prompt ids for the conversation, dropping the oldest exchanges until `reserve` new tokens
    fit in the context window (a system message is always kept)."""
    ctx = lm.model.cfg.context_length
    while True:
        ids = chat_ids(lm, template, history)
        if len(ids) + reserve <= ctx:
            return ids
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        if len(turns) <= 1:
            raise LMForgeError(f"the message is too long for the model's context window ({ctx} tokens, "
                               f"{reserve} kept for the answer)")
        first = turns[0]  # drop the oldest exchange: a user message and the answer to it
        pair = history[first]["role"] == "user" and first + 1 < len(history) - 1 \
            and history[first + 1]["role"] == "assistant"
        del history[first:first + (2 if pair else 1)]


def chat(lm: Loaded, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float | None = 0.9, top_k: int | None = None, seed: int | None = None,
         repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> list[dict]:
    """Read user turns from `stdin` until /exit or end of input; returns the final history."""
    if not lm.kind.generates:
        raise LMForgeError(f"{lm.path} is {lm.kind.phrase}, not a model that can chat")
    validate_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    if not lm.meta.get("chat_template") and not lm.tokenizer.config.get("chat_template"):
        # A base model only continues text: it runs, but says nothing about why answers ramble.
        print(f"warning: {lm.path} was not tuned for chat (it has no chat template), so its answers may not "
              "follow the conversation; fine-tune it with `lmforge finetune instruct` first", file=sys.stderr)
    template, stop = chat_setup(lm)
    reserve = min(max_new_tokens, lm.model.cfg.context_length // 2)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    prefix = PrefixCache(device=lm.device)  # each turn resends the history: its start is computed once
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {lm.path} ({template.name} format). {HELP}", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(start)
            stdout.write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = fit_history(lm, template, history, reserve)
        except LMForgeError as e:
            history.pop()
            stdout.write(f"({e})\n")
            continue
        stdout.write("assistant> ")
        answer = generate_text(lm.model, lm.tokenizer, "", max_new_tokens=reserve, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=None if seed is None else seed + turn,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty, stop_ids=stop, prompt_ids=ids,
                               stream=lambda s: (stdout.write(s), stdout.flush()), prefix_cache=prefix)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": answer.strip()})
        turn += 1
    return history
