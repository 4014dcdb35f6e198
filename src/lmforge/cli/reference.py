"""The CLI reference as Markdown, generated from the verbs' own dataclasses (the ones their flags are
built from), so the documentation cannot drift from the parser. The docs site renders it at build
time (`docs/hooks/cli_reference.py`); `python -m lmforge.cli.reference` prints it."""

from __future__ import annotations

import dataclasses
import re
import typing

from ..core.config import _BOUND_TEXT, _base_type, _field_groups, flag
from . import EXAMPLES, GROUPS, VERBS, _dataclass


def _cell(text: str) -> str:
    # Help strings are argparse's (a literal % is written %%) and plain text: characters Markdown would
    # read as links, emphasis or HTML are escaped.
    text = text.replace("%%", "%").replace("\n", " ").replace("<", "&lt;")
    return re.sub(r"([\\|\[\]*_`])", r"\\\1", text)


def _type_name(tp) -> str:
    base, is_list = _base_type(tp)
    name = "yes/no" if base is bool else getattr(base, "__name__", str(base))
    name = {"str": "text", "int": "integer", "float": "number", "dict": "YAML", "Any": "YAML"}.get(name, name)
    return f"{name} ..." if is_list else name


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or value == []:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return ", ".join(f"`{c}`" for c in meta["choices"])
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in (meta.get("bounds") or {}).items())


def verb_table(name: str) -> str:
    """One verb's section: its description, a table of its arguments, and its examples."""
    cls = _dataclass(VERBS[name][0])
    hints = typing.get_type_hints(cls)
    lines = [f"## lmforge {name}", "", (cls.__doc__ or VERBS[name][2]).strip(), ""]
    positional = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    usage = " ".join(f.name.upper() + (" ..." if _base_type(hints[f.name])[1] else "") for f in positional)
    lines += [f"`lmforge {name} {usage + ' ' if usage else ''}[options]`", ""]
    for title, fields in _field_groups(cls):
        shown = [f for f in fields if f.metadata.get("cli", True)]
        if not shown:
            continue
        if len(_field_groups(cls)) > 1:
            lines += [f"**{_cell(title)}**", ""]
        lines += ["| argument | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for f in shown:
            meta = f.metadata
            names = f.name.upper() if meta.get("positional") else flag(f.name)
            if meta.get("short"):
                names = f"{meta['short']}, {names}"
            lines.append(f"| `{names}` | {_type_name(hints[f.name])} | {_default(f)} | {_allowed(f)} | "
                         f"{_cell(meta.get('help', ''))} |")
        lines.append("")
    lines += ["`--config FILE.yaml` reads any of these from a YAML file (keys are the names above without "
              "`--`); flags given on the command line win.", ""]
    if name in EXAMPLES:
        lines += ["```", EXAMPLES[name].strip(), "```", ""]
    return "\n".join(lines)


def markdown() -> str:
    """The whole CLI reference: an index of the verbs, then one section per verb."""
    lines = ["# CLI reference", "",
             "Generated from the dataclasses the flags are built from, each time the site is built. Every "
             "verb also answers `lmforge VERB --help`.", "",
             "| verb | what it does |", "|---|---|"]
    for name, (_, _, help_text) in VERBS.items():
        anchor = "lmforge-" + name.replace(" ", "-")
        lines.append(f"| [`{name}`](#{anchor}) | {_cell(help_text)} |")
    lines += ["", "Verbs with actions: " + "; ".join(f"`{g}`: {_cell(h)}" for g, (h, _) in GROUPS.items()) + ".", ""]
    return "\n".join(lines + [verb_table(name) for name in VERBS])


if __name__ == "__main__":
    print(markdown())
