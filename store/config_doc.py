"""docs/CONFIG.md, generated from the config's dataclasses (store/config.py): every key, its
type, its default and the comments written beside it, so the reference cannot drift from the
schema. `python -m store.config_doc > docs/CONFIG.md` rewrites it; tests/test_config.py fails
when the file is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap

from store import config as schema

SECTIONS = [("", schema.Config), ("data", schema.DataConfig), ("encoders[]", schema.EncoderConfig),
            ("codec", schema.CodecConfig), ("embed", schema.EmbedConfig), ("model", schema.ModelConfig),
            ("train", schema.TrainConfig), ("sample", schema.SampleConfig), ("storage", schema.StorageConfig)]
HEADER = """# Configuration reference

Generated from `store/config.py` by `python -m store.config_doc > docs/CONFIG.md`; do not edit
by hand (tests/test_config.py fails when this file is stale). A config is a YAML file of these
sections; `base: other.yaml` starts from another file, and every command takes `--set
KEY=VALUE` (e.g. `--set train.steps=500`, `--set encoders.0.layer=-2`). Unknown keys are
refused with their name. The shipped recipes are in `configs/`.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the comment lines right above it and the one at its line's end."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        end = lines[node.end_lineno - 1]
        inline = end.split("  # ", 1)[1].strip() if "  # " in end else ""
        comments[node.target.id] = " ".join(part for part in (*above, inline) if part)
    return comments


def type_name(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("|", "\\|")


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def render() -> str:
    out = [HEADER]
    for section, cls in SECTIONS:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        comments = field_comments(cls)
        out += ["", f"## `{section or 'top level'}`", ""]
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [doc.replace("\n", " "), ""]
        out += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(field.default_factory() if callable(field.default_factory) else None):
                continue  # a section of its own, below
            key = f"{section}.{field.name}" if section else field.name
            text = comments.get(field.name, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{type_name(hints[field.name])}` | `{default_text(field)}` | {text} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
