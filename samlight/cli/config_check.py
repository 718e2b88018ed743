"""Catch misspelt or unknown config keys before any work starts, and name the nearest valid key.

jsonargparse rejects unknown keys too, but only after importing every class, and its message for a key inside a
`class_path` section is a page of union-type errors. This check reads the YAML files and `--section.key` arguments
as given, walks them against the parser's keys (and, inside `class_path` sections, the class's constructor
arguments) and reports every unknown key at once, with `difflib`'s closest match.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Keys jsonargparse accepts inside any class section besides the constructor's arguments.
_CLASS_SECTION_KEYS = ("class_path", "init_args", "dict_kwargs", "__path__")
# Where short class names (`class_path: LearningRateMonitor`) usually come from.
_SHORT_NAME_MODULES = ("lightning.pytorch.callbacks", "lightning.pytorch.loggers", "samlight.callbacks")
# Top-level flags that are not config keys.
_FLAGS = ("config", "print_config", "help", "c", "h")


@dataclass(frozen=True)
class UnknownKey:
    """A key no parser section or class accepts.

    Attributes:
        key: dotted key as the user wrote it (`trainer.max_step`, `data.init_args.batch_sise`).
        source: the config file it came from, or "command line".
        suggestion: nearest valid dotted key, or None when nothing is close.
    """

    key: str
    source: str
    suggestion: str | None

    def describe(self) -> str:
        hint = f"; did you mean '{self.suggestion}'?" if self.suggestion else ""
        return f"unknown config key '{self.key}' (in {self.source}){hint}"


class _Known:
    """The parser's dotted keys, as a tree to find a key's longest valid prefix and its siblings."""

    def __init__(self, parser: Any) -> None:
        self.keys: set[str] = set()
        self.class_keys: set[str] = set()  # keys whose value may be a class_path section
        for action in parser._actions:
            dest = getattr(action, "dest", None) or ""
            if dest in ("", "help"):
                continue
            if dest.endswith(".help"):
                # jsonargparse adds a `<key>.help` action for every key that takes a class.
                self.class_keys.add(dest[: -len(".help")])
            else:
                self.keys.add(dest)
        # Parent sections (`trainer`, `model`) are keys too.
        for key in list(self.keys):
            parts = key.split(".")
            for i in range(1, len(parts)):
                self.keys.add(".".join(parts[:i]))

    def children(self, prefix: str) -> list[str]:
        depth = 0 if not prefix else prefix.count(".") + 1
        return sorted(
            {
                k.split(".")[depth]
                for k in self.keys
                if (not prefix or k.startswith(prefix + ".")) and k != prefix
            }
        )

    def is_section(self, key: str) -> bool:
        return any(k.startswith(key + ".") for k in self.keys)

    def suggest(self, key: str) -> str | None:
        """Nearest valid key: keep the longest valid prefix, correct the first wrong part, keep the rest."""
        parts = key.split(".")
        prefix = ""
        for i, part in enumerate(parts):
            candidate = f"{prefix}.{part}" if prefix else part
            if candidate in self.keys:
                prefix = candidate
                continue
            match = difflib.get_close_matches(part, self.children(prefix), n=1, cutoff=0.6)
            if not match:
                whole = difflib.get_close_matches(key, sorted(self.keys), n=1, cutoff=0.6)
                return whole[0] if whole else None
            fixed = f"{prefix}.{match[0]}" if prefix else match[0]
            rest = ".".join([fixed, *parts[i + 1 :]])
            return rest if rest in self.keys else fixed
        return None


def _class_parameters(class_path: str) -> list[str] | None:
    """Constructor argument names of `class_path`, or None when they cannot be known (unresolvable path or
    `**kwargs`, which jsonargparse follows into parent classes): such sections are left to jsonargparse."""
    module_name, _, name = class_path.rpartition(".")
    cls = None
    for module in [module_name] if module_name else _SHORT_NAME_MODULES:
        try:
            cls = getattr(importlib.import_module(module), name)
            break
        except (ImportError, AttributeError):
            continue
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]


def _check_class_section(value: Any, key: str, source: str, class_path: str | None) -> Iterable[UnknownKey]:
    """Check a `{class_path, init_args}` section (or a list of them) against the class's constructor."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _check_class_section(item, f"{key}[{i}]", source, None)
        return
    if not isinstance(value, dict):
        return
    class_path = value.get("class_path", class_path)
    if not isinstance(class_path, str):
        return
    params = _class_parameters(class_path)
    init_args = dict(value.get("init_args") or {})
    # Shorthand: init arguments given next to class_path instead of under init_args.
    init_args.update({k: v for k, v in value.items() if k not in _CLASS_SECTION_KEYS})
    prefix = f"{key}.init_args" if "init_args" in value else key
    for arg, arg_value in init_args.items():
        if params is not None and arg not in params:
            match = difflib.get_close_matches(str(arg), params, n=1, cutoff=0.6)
            yield UnknownKey(f"{prefix}.{arg}", source, f"{prefix}.{match[0]}" if match else None)
        elif _looks_like_class_section(arg_value):
            yield from _check_class_section(arg_value, f"{prefix}.{arg}", source, None)


def _looks_like_class_section(value: Any) -> bool:
    if isinstance(value, dict):
        return "class_path" in value
    return isinstance(value, list) and any(isinstance(v, dict) and "class_path" in v for v in value)


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_tree(
    tree: dict[str, Any], prefix: str, known: _Known, merged: dict[str, Any], source: str
) -> Iterable[UnknownKey]:
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in known.class_keys:
            earlier = _lookup(merged, key)
            class_path = earlier.get("class_path") if isinstance(earlier, dict) else None
            yield from _check_class_section(value, key, source, class_path)
        elif key in known.keys:
            if isinstance(value, dict) and known.is_section(key):
                yield from _check_tree(value, key, known, merged, source)
        else:
            yield UnknownKey(key, source, known.suggest(key))


def _nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _split_args(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Config files and (`--key` name, value) pairs from one subcommand's arguments, in order."""
    configs, keys = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config"):
            if i + 1 < len(args):
                configs.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
                i += 1
            keys.append((name.rstrip("+"), value if eq or value else None))
        i += 1
    return configs, keys


def find_unknown_keys(parser: Any, args: Sequence[str]) -> list[UnknownKey]:
    """Unknown keys in the config files and `--section.key` arguments of one subcommand.

    Args:
        parser: the subcommand's jsonargparse parser (LightningCLI's `fit` parser, say).
        args: the subcommand's arguments (after `fit`), e.g. `["--config", "a.yaml", "--trainer.max_steps=3"]`.
    """
    known = _Known(parser)
    configs, cli_keys = _split_args(args)
    merged: dict[str, Any] = {}
    problems: list[UnknownKey] = []
    for path in configs:
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports unreadable files with their own message
        if not isinstance(tree, dict):
            continue
        problems.extend(_check_tree(tree, "", known, merged, path))
        merged = _deep_merge(merged, tree)
    for key, value in cli_keys:
        if key in known.class_keys and value and not value.lstrip().startswith(("{", "[")):
            # `--data=pkg.Class` or `--data.class_path=...` picks the class later keys are checked against.
            merged = _deep_merge(merged, _nested(key, {"class_path": value}))
        elif key.endswith(".class_path") and key[: -len(".class_path")] in known.class_keys and value:
            merged = _deep_merge(merged, _nested(key[: -len(".class_path")], {"class_path": value}))
        if key in known.keys or key in _FLAGS:
            continue
        parts = key.split(".")
        owner = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in known.keys),
            "",
        )
        if owner in known.class_keys:
            rest = parts[len(owner.split(".")) :]
            section = _lookup(merged, owner)
            via_init_args = bool(rest) and rest[0] == "init_args"
            rest = rest[1:] if via_init_args else rest
            class_path = section.get("class_path") if isinstance(section, dict) else None
            if rest and class_path:
                given = {"init_args": {rest[0]: None}} if via_init_args else {rest[0]: None}
                problems.extend(_check_class_section(given, owner, "command line", class_path))
            continue
        problems.append(UnknownKey(key, "command line", known.suggest(key)))
    return problems


def format_problems(problems: Sequence[UnknownKey], command: str = "samlight fit") -> str:
    lines = [f"samlight: {p.describe()}" for p in problems]
    lines.append(
        f"Nothing was started. `{command} --help` lists every key; `--print_config` shows the merged config."
    )
    return "\n".join(lines)
