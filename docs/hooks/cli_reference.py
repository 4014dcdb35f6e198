"""MkDocs hook: the CLI reference page is generated from the verbs' dataclasses at build time,
so it always describes the flags the parser really has (see lmforge/cli/reference.py)."""

from mkdocs.structure.files import File


def on_files(files, config):
    from lmforge.cli.reference import markdown

    files.append(File.generated(config, "reference/cli.md", content=markdown()))
    return files
