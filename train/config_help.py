"""`python -m train --help`: every config section and key with its type, default and one-line description.

Generated from the config dataclasses themselves, so it cannot drift from them: the description of a key is the
comment on its line or the comment block just above it in the dataclass source; a section's is its class docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class KeyHelp:
    key: str  # dotted YAML key, e.g. train.max_steps
    type: str
    default: str
    description: str


def yaml_name(field_name: str) -> str:
    """Python keywords are fields with a trailing underscore (`async_`); YAML spells them without it."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_label(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_label(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):  # an item of a list of sections: its keys
        return "{" + ", ".join(yaml_name(f.name) for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


def default_label(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, default=lambda item: dataclasses.asdict(item))
    return repr(value) if isinstance(value, str) else str(value)


# A sentence ends at a full stop followed by a capital or a backquote, not inside "e.g. " / "i.e. ".
SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])")


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = SENTENCE_END.search(text)
    return text[: match.start() + 1] if match else text


def section_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    # A dataclass without a docstring gets its signature as __doc__: not a description.
    return "" if doc.startswith(cls.__name__ + "(") else first_sentence(inspect.cleandoc(doc))


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in the class source (trailing, else the block above)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    (class_node,) = ast.parse(source).body
    found: dict[str, str] = {}
    for node in class_node.body:  # type: ignore[attr-defined]
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        end = node.end_lineno or node.lineno
        text = next((comments[n] for n in range(node.lineno, end + 1) if n in comments), "")
        if not text:
            block, line = [], node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                block.insert(0, comments[line])
                line -= 1
            text = " ".join(block)
        found[node.target.id] = text
    return found


def config_keys(cls: type, prefix: str = "") -> tuple[list[tuple[str, str]], list[KeyHelp]]:
    """(sections as (dotted name, description), keys) of dataclass `cls`, nested sections included."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    sections: list[tuple[str, str]] = []
    keys: list[KeyHelp] = []
    for f in dataclasses.fields(cls):
        name = prefix + yaml_name(f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((name, first_sentence(comments.get(f.name, "")) or section_doc(tp)))
            sub_sections, sub_keys = config_keys(tp, name + ".")
            sections += sub_sections
            keys += sub_keys
            continue
        keys.append(KeyHelp(name, type_label(tp), default_label(f), first_sentence(comments.get(f.name, ""))))
    return sections, keys


def render_help(config_cls: type, usage: str) -> str:
    sections, keys = config_keys(config_cls)
    by_section: dict[str, list[KeyHelp]] = {"": []}
    for name, _ in sections:
        by_section[name] = []
    for k in keys:
        section = k.key.rsplit(".", 1)[0] if "." in k.key else ""
        by_section.setdefault(section, []).append(k)
    key_w = min(38, max(len(k.key) for k in keys))
    type_w = min(28, max(len(k.type) for k in keys))
    out = [usage.rstrip(), ""]
    descriptions = dict(sections)
    for section, items in by_section.items():
        if not items:
            continue
        title = section or "top level"
        out.append(f"{title}:" + (f"  {descriptions[section]}" if descriptions.get(section) else ""))
        for k in items:
            head = f"  {k.key:<{key_w}} {k.type:<{type_w}} = {k.default}"
            out.append(f"{head}  {k.description}" if k.description else head)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
