"""What every `samlight` dispatcher (`samlight`, `samlight data`) starts with: the command line as a list, or the
usage text when it names no command."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def command_line(argv: Sequence[str] | None, usage: str) -> list[str] | None:
    """`argv` (default `sys.argv[1:]`) as a list starting with the sub-command, or None after printing `usage`
    when there is no sub-command or it is `-h`/`--help`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return None
    return args
