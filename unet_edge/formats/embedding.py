"""EMBEDDING.md, which `export` writes into each export folder (a section per model) and `deploy` beside the model it
chose: what to ship and its format's embedding snippet (`Format.embedding`, declared in the format's module; a test
keeps each equal to the README's text), with the C++ host's build and run lines where the format has one.
"""

from __future__ import annotations

from typing import Any

from .base import Format

__all__ = ["EMBEDDING_FILE", "embedding_markdown", "folder_embedding_markdown"]

EMBEDDING_FILE = "EMBEDDING.md"


def embedding_markdown(fmt: Format, file: str, companions: list[str], precision: str = "fp32") -> str:
    """EMBEDDING.md for a model file: what to ship and the README's snippet for its runtime."""
    ship = ", ".join(f"`{name}`" for name in [file, *companions])
    lines = [f"# Embedding `{file}`", "", f"Ship {ship} (`manifest.json` lists each file's sha256).", ""]
    snippet = fmt.embedding
    if snippet is None:
        return "\n".join([*lines, f"unet-edge has no embedding snippet for the {fmt.name} format.", ""])
    lines += [f"{snippet.intro}; the snippet names the fp32 export's files, this model is `{file}`:", ""]
    note = snippet.notes.get(precision)
    if note:
        lines += [note, ""]
    lines += ["```python", snippet.imports, "", snippet.code.rstrip("\n"), "```", ""]
    if snippet.cpp:
        lines += [
            "In C++, the host program of unet-edge's `examples/cpp` (a CMake project built against the runtime's "
            "own package) segments a PNG and writes the palette mask:",
            "",
            "```sh",
            snippet.cpp.format(model=file).rstrip("\n"),
            "```",
            "",
        ]
    return "\n".join(lines)


def folder_embedding_markdown(entries: list[dict[str, Any]]) -> str:
    """EMBEDDING.md of an export folder: each model's section (`embedding_markdown`) in manifest order."""
    from . import FORMATS

    sections = ["# Embedding the models of this folder", ""]
    for entry in entries:
        fmt = FORMATS.get(entry.get("format", ""))
        if fmt is not None:
            companions = [companion["file"] for companion in entry.get("companions", [])]
            sections.append("#" + embedding_markdown(fmt, entry["file"], companions, entry.get("precision", "fp32")))
    return "\n".join(sections)
