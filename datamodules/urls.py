"""Expand shard URL specs: a list, brace patterns (`sa_{000000..000999}.tar`), globs, `pipe:` commands, `demo`."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from braceexpand import braceexpand

_GLOB_CHARS = frozenset("*?[")


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train") -> list[str]:
    """Turn a URL spec into the list of shard URLs, in a stable order.

    Args:
        spec: one string or a list of them. Each string may hold several patterns separated by `::`
            (webdataset's convention); each pattern is brace-expanded; a local pattern with `*`, `?` or `[` is
            globbed (sorted); `pipe:` commands and `scheme://` URLs are kept as they are (after brace expansion).
            The word `demo` stands for samlight's synthetic demo set (written on first use).
        split: which demo split `demo` means ("train" or "val").
    Returns:
        the shard URLs.
    Raises:
        ValueError when the spec is empty or a glob matches nothing.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for pattern in str(item).split("::"):
            pattern = pattern.strip()
            if not pattern:
                continue
            if pattern == "demo":
                urls.extend(_demo_urls(split))
                continue
            for url in braceexpand(pattern):
                urls.extend(_glob_local(url))
    if not urls:
        raise ValueError(
            f"no shard URLs in {spec!r}: give paths, a brace pattern, a glob, pipe: commands or 'demo'"
        )
    return urls


def _glob_local(url: str) -> list[str]:
    if url.startswith("pipe:") or "://" in url or not (_GLOB_CHARS & set(url)):
        return [url]
    matches = sorted(glob.glob(os.path.expanduser(url)))
    if not matches:
        raise ValueError(
            f"the shard glob {url!r} matches no file; check the path (relative to {os.getcwd()})"
        )
    return matches


def _demo_urls(split: str) -> list[str]:
    from samlight.datamodules.demo import make_demo_shards

    train, val = make_demo_shards()
    if split not in ("train", "val"):
        raise ValueError(f"demo split must be 'train' or 'val', got {split!r}")
    return train if split == "train" else val
