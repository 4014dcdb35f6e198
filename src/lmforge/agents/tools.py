"""The tools an agent may use, and nothing else: a calculator, retrieval, and reading files
under one directory. There is no shell tool. Which tools exist is decided by the host (the
`--tools` flag), never by the model or by text it reads."""

from __future__ import annotations

import ast
import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LMForgeError

MAX_INPUT = 2000  # characters of one tool input
MAX_READ = 8000  # characters a read returns
MAX_EXPONENT = 1000
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # 1,234 -> 1234
MAX_INT_BITS = 10_000  # about 3,000 digits: bigger numbers are refused before they are computed


class ToolError(Exception):
    """A failed call: its message goes back to the model as the observation."""


@dataclass
class Tool:
    name: str
    description: str
    run: Callable[[str], str]
    param: str = "input"  # the one string argument, when the model calls the tool natively

    def spec(self) -> dict:
        """The tool in OpenAI's `tools` shape: one required string argument."""
        params = {"type": "object", "properties": {self.param: {"type": "string", "maxLength": MAX_INPUT}},
                  "required": [self.param], "additionalProperties": False}
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": params}}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Arithmetic (+ - * / // % ** and parentheses on numbers) read with `ast`, never `eval`:
    names, attributes, calls and anything else are refused, and so are huge powers and numbers."""
    expression = expression.strip().strip("`").strip()
    if not expression or len(expression) > MAX_INPUT:
        raise ToolError("give an arithmetic expression, e.g. 12 * (3 + 4)")
    try:
        tree = ast.parse(THOUSANDS.sub("", expression.replace("^", "**")), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression[:80]!r}") from None
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    return str(value)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT and abs(left) not in (0, 1):
            raise ToolError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and left.bit_length() * right > MAX_INT_BITS:
            raise ToolError("the result would be too large")
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ToolError("the result would be too large")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result would be too large") from None
        if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
            raise ToolError("the result is not a finite real number")
        return result
    what = {ast.Name: "names", ast.Attribute: "attributes", ast.Call: "function calls"}.get(type(node))
    raise ToolError(f"only numbers and + - * / // % ** are allowed{f' (no {what})' if what else ''}")


def reader(directory: str | Path) -> Callable[[str], str]:
    """A `read` tool confined to `directory`: relative paths only; `..` and symlinks are resolved
    first, and anything that lands outside the directory is refused."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise LMForgeError(f"read:{directory}: not a directory")

    def read(name: str) -> str:
        name = name.strip().strip("`'\"").strip()
        if not name or len(name) > 1000 or "\x00" in name:
            raise ToolError("give a file path relative to the readable directory")
        if os.path.isabs(name) or name.startswith("~"):
            raise ToolError(f"refused: {name!r} is an absolute path; only files under the readable directory "
                            "can be read")
        target = (root / name).resolve()
        if target != root and root not in target.parents:
            raise ToolError(f"refused: {name!r} is outside the readable directory")
        if target.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
            return "\n".join(entries[:200]) or "(empty directory)"
        if not target.is_file():
            raise ToolError(f"no such file: {name}")
        with open(target, "rb") as f:
            data = f.read(MAX_READ + 1)
        text = data[:MAX_READ].decode("utf-8", errors="replace")
        return text + ("\n[... cut]" if len(data) > MAX_READ else "")

    return read


def searcher(index_dir: str, device: str = "auto", k: int = 3) -> Callable[[str], str]:
    from ..rag.index import Index

    index = Index(index_dir, device=device)

    def search(query: str) -> str:
        if not query.strip():
            raise ToolError("give a search query")
        hits = index.search(query[:MAX_INPUT], k)
        return "\n\n".join(f"[{h.chunk.where}] {h.chunk.text}" for h in hits) or "no results"

    return search


def make_tools(spec: str, device: str = "auto") -> dict[str, Tool]:
    """`calculator,search:INDEX,read:DIR` -> the allow-list of tools. Unknown names are an error."""
    tools: dict[str, Tool] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, where = item.partition(":")
        if name in tools:
            raise LMForgeError(f"--tools names {name!r} twice")
        if name == "calculator" and not where:
            tools[name] = Tool(name, "evaluates arithmetic, e.g. 1234 * 5678 or (2 + 3) ** 4", calculate, "expression")
        elif name == "search" and where:
            tools[name] = Tool(name, "searches the documents; the input is a query", searcher(where, device), "query")
        elif name == "read" and where:
            tools[name] = Tool(name, "reads a file; the input is a path relative to the document folder",
                               reader(where), "path")
        else:
            raise LMForgeError(f"unknown tool {item!r}: the tools are calculator, search:INDEX and read:DIR")
    if not tools:
        raise LMForgeError("--tools is empty (e.g. --tools calculator,search:INDEX,read:DIR)")
    return tools
