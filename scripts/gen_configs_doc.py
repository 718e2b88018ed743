"""Write docs/configs.md: every option of every shipped config, explained from the code.

    python scripts/gen_configs_doc.py            # rewrites docs/configs.md
    python scripts/gen_configs_doc.py --check    # exit 1 if docs/configs.md is out of date

Meanings come from the `samlight fit` parser (its help texts) and, inside `class_path` sections, from the class's
docstring (`Args:`); the config file's own inline comment is shown beside it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import docstring_parser
import yaml

REPO = Path(__file__).resolve().parents[1]
ALWAYS_ON = ("panels", "data_health", "throughput", "lr_monitor")


class _Captured(Exception):
    pass


def fit_parser() -> Any:
    """The `samlight fit` parser (built exactly as the CLI builds it, nothing parsed)."""
    from lightning.pytorch import LightningDataModule

    from samlight.cli.train import SamlightCLI
    from samlight.training.module import SamModule

    class Capture(SamlightCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Captured(self._subcommand_parsers["fit"])

    try:
        Capture(SamModule, LightningDataModule, subclass_mode_data=True, args=["fit"])
    except _Captured as captured:
        return captured.args[0]
    raise RuntimeError("SamlightCLI did not reach parse_arguments")


def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    text = re.sub(r"\s*\(type: .*$", "", text)  # jsonargparse appends the type and default
    return text.replace("|", "\\|")


def _class_docs(class_path: str) -> dict[str, str]:
    """Argument name -> description from a class's docstring (class or __init__)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    docs: dict[str, str] = {}
    for doc in (inspect.getdoc(cls.__init__), inspect.getdoc(cls)):
        for param in docstring_parser.parse(doc or "").params:
            for arg in param.arg_name.split(","):
                docs.setdefault(arg.strip(), param.description or "")
    return docs


def _value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    if len(text) > 60:
        text = text[:57] + "..."
    return f"`{text}`".replace("|", "\\|")


def _comments(path: Path) -> dict[str, str]:
    """Inline `# comments` by dotted key path (list items collapsed: `model.prompts.init_args`)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = re.match(r"^(\s*)(-\s+)?([\w.@/-]+):\s*(.*)$", line)
        if not match:
            continue
        indent = len(match[1]) + (len(match[2]) if match[2] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match[3]))
        rest = match[4]
        if "#" in rest and not rest.lstrip().startswith("#"):
            key = ".".join(k for _, k in stack)
            comments.setdefault(key, rest.split("#", 1)[1].strip())
    return comments


def _rows(
    node: Any, key: str, helps: dict[str, str], class_doc: dict[str, str] | None
) -> list[tuple[str, Any, str]]:
    """(dotted key, value, meaning) for every leaf; class_path sections expand into their init args."""
    if isinstance(node, dict) and "class_path" in node:
        docs = _class_docs(node["class_path"])
        section = re.sub(r"\[\d+\]$", "", key)
        meaning = helps.get(section) or (class_doc or {}).get(section.rsplit(".", 1)[-1])
        rows = [(f"{key}.class_path", node["class_path"], _first_sentence(meaning))]
        init = node.get("init_args") or {}
        for arg, value in init.items():
            rows += _rows(value, f"{key}.init_args.{arg}", helps, docs)
        return rows
    if isinstance(node, list) and any(isinstance(v, dict) and "class_path" in v for v in node):
        rows = []
        for i, item in enumerate(node):
            rows += _rows(item, f"{key}[{i}]", helps, class_doc)
        return rows
    if (
        isinstance(node, dict)
        and (key in helps or not key or any(h.startswith(key + ".") for h in helps))
        and node
    ):
        if key in helps and not any(h.startswith(key + ".") for h in helps):
            return [(key, node, _first_sentence(helps[key]))]
        rows = []
        for name, value in node.items():
            rows += _rows(value, f"{key}.{name}" if key else name, helps, class_doc)
        return rows
    leaf = key.rsplit(".", 1)[-1]
    meaning = helps.get(key) or (class_doc or {}).get(leaf, "")
    return [(key, node, _first_sentence(meaning))]


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _config_section(path: Path, helps: dict[str, str]) -> list[str]:
    tree = yaml.safe_load(path.read_text()) or {}
    comments = _comments(path)
    out = [f"## `configs/{path.name}`", ""]
    header = _header(path)
    if header:
        out += ["```", *header, "```", ""]
    out += ["| key | value | meaning | note in the file |", "|---|---|---|---|"]
    for key, value, meaning in _rows(tree, "", helps, None):
        plain = re.sub(r"\[\d+\]", "", key)
        note = comments.get(plain)
        if note is None and plain.endswith(".class_path"):
            # A flow-style `init_args: {...}  # comment` explains the whole class section.
            note = comments.get(plain.removesuffix("class_path") + "init_args")
        note = (note or "").replace("|", "\\|")
        out.append(f"| `{key}` | {_value(value)} | {meaning} | {note} |")
    return [*out, ""]


def _section_reference(parser: Any, prefix: str, helps: dict[str, str]) -> list[str]:
    defaults = parser.get_defaults()
    out = ["| key | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        dest = action.dest or ""
        if not dest.startswith(prefix + ".") or dest.endswith(".help"):
            continue
        default = defaults.get(dest)
        out.append(f"| `{dest}` | {_value(default)} | {_first_sentence(helps.get(dest))} |")
    return [*out, ""]


def _class_reference(class_path: str, prefix: str) -> list[str]:
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    docs = _class_docs(class_path)
    out = ["| key | default | meaning |", "|---|---|---|"]
    for param in inspect.signature(cls).parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        out.append(
            f"| `{prefix}.{param.name}` | {_value(default)} | {_first_sentence(docs.get(param.name))} |"
        )
    return [*out, ""]


def render() -> str:
    parser = fit_parser()
    helps = {a.dest: a.help for a in parser._actions if a.dest and isinstance(a.help, str)}
    # Docstring entries naming several arguments ("a, b, c: ...") are not matched by jsonargparse.
    for arg, text in _class_docs("samlight.training.module.SamModule").items():
        if not helps.get(f"model.{arg}"):
            helps[f"model.{arg}"] = text
    out = [
        "# Configuration reference",
        "",
        "Generated by `python scripts/gen_configs_doc.py` from the `samlight fit` parser and the classes' docstrings;",
        "edit the code or the configs, not this file. Run `samlight fit --config FILE --print_config` to see a merged",
        "config with every default, and `samlight fit --help` for every key. Add-on configs (ddp, fsdp, slurm, wandb)",
        "go after a base config: `--config configs/quickstart.yaml --config configs/wandb.yaml`; lists are replaced,",
        "not appended, when configs merge (see docs/dashboards.md).",
        "",
    ]
    for path in sorted((REPO / "configs").glob("*.yaml")):
        out += _config_section(path, helps)
    out += [
        "## Sections every run has",
        "",
        "Present whatever configs are merged (samlight/cli/dashboards.py); set them in any config or on the command",
        "line, e.g. `--panels.num_images=0` to switch the mask panels off.",
        "",
    ]
    for section in ALWAYS_ON:
        out += [f"### `{section}`", "", *_section_reference(parser, section, helps)]
    out += ["## `model` (SamModule): every option", "", *_section_reference(parser, "model", helps)]
    out += [
        "## `data` (SA1BDataModule, the shipped configs' datamodule): every option",
        "",
        *_class_reference("samlight.datamodules.SA1BDataModule", "data.init_args"),
    ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if docs/configs.md is out of date")
    args.add_argument("--out", default=str(REPO / "docs" / "configs.md"))
    opts = args.parse_args(argv)
    text = render()
    out = Path(opts.out)
    if opts.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is out of date: run python scripts/gen_configs_doc.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
