"""How the CLI fails on bad arguments: one `error:` line naming the verb, with the closest spelling of a
mistyped flag or choice, exit status 2, and no usage block (`--help` shows that)."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with lmforge's way of failing: one `error:` line naming the verb, exit status 2, and
    no usage block (`--help` has it). Every verb's parser is one of these (subparsers take the class)."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        close = difflib.get_close_matches(m[1], re.findall(r"'([^']*)'", m[2]), n=1) if m else []
        hint = f"did you mean {close[0]!r}?" if close else f"see {self.prog} --help"
        self.exit(2, f"error: {self.prog}: {message} ({hint})\n")


def unknown_flag(parser: argparse.ArgumentParser, ns: argparse.Namespace, extras: list[str]) -> str:
    """The error for arguments no flag takes, with the closest flag of the chosen verb when one is near."""
    verb = parser
    for key in ("command", "sub"):  # down to the verb's own parser
        action = next((a for a in verb._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or getattr(ns, key, None) not in action.choices:
            break
        verb = action.choices[getattr(ns, key)]
    word = extras[0]
    message = f"{verb.prog}: unrecognised argument {word!r}"
    if word.startswith("-"):
        flags = [f for f in verb._option_string_actions if f.startswith("--")]
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
        message += f" (did you mean {close[0]}?)" if close else f" (see {verb.prog} --help)"
    return message
