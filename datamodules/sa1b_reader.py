"""Read SA-1B tar shards into raw samples (`<key>.jpg` + `<key>.json` [+ `<key>.clip.npy`]), whatever the member order.

Meta's tars are not grouped by key, so members are held per key until the sample is complete; anything left
incomplete when the shard ends, and every unreadable or truncated shard, is skipped and counted (`SkipCounter`).
Tar parsing and URL opening (local paths, `pipe:` commands, http) are webdataset's.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger("samlight.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg")
# What opening and reading a shard raises on bad input: OSError (missing file, failed `pipe:` command, network),
# tar and compression errors, EOF, and webdataset's ValueError for a URL it cannot open.
SHARD_READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)


@dataclass
class RawSample:
    """One complete sample as bytes: `members` maps extension ("jpg", "json", "clip.npy") to content."""

    url: str
    key: str
    members: dict[str, bytes]

    @property
    def image(self) -> bytes:
        return self.members.get("jpg", self.members.get("jpeg", b""))


class SkipCounter:
    """Counts skipped samples and shards by reason and warns once per (shard, reason) with the shard and key.

    Counts accumulate in `pending` until `take()` hands them to the next yielded sample, which is how counts
    made in DataLoader worker processes reach the main process.

    Args:
        count_shared: False in workers that read shards another worker also reads (validation split by sample
            index): shard- and pairing-level defects are then counted by one worker only, so totals stay exact.
    """

    def __init__(self, *, count_shared: bool = True) -> None:
        self.count_shared = count_shared
        self.pending: Counter = Counter()
        self._warned: set[tuple[str, str]] = set()

    def skip(self, reason: str, url: str, key: str | None, detail: str = "", *, shared: bool = False) -> None:
        """Record one skipped sample (or shard, `key=None`)."""
        if shared and not self.count_shared:
            return
        self.pending[reason] += 1
        where = f"shard {url}" + ("" if key is None else f" key {key!r}")
        message = f"samlight data: skipped ({reason}) at {where}: {detail}"
        if (url, reason) in self._warned:
            log.debug(message)
        else:
            self._warned.add((url, reason))
            log.warning(message + " (further skips of this kind in this shard are logged at DEBUG)")

    def take(self) -> dict[str, int]:
        """Return the counts since the last call and reset them."""
        counts, self.pending = dict(self.pending), Counter()
        return counts


def iter_members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, extension, bytes) for each regular file of the tar at `url` (path, `pipe:...`, http...).

    Raises whatever opening or reading raises (`SHARD_READ_ERRORS` on bad input); `iter_shard` counts those.
    """
    stream = gopen(url)
    finished = False
    try:
        for member in tar_file_iterator(stream):
            key, ext = base_plus_ext(member["fname"])
            if key is None or ext is None:
                continue
            yield key, ext.lower(), member["data"]
        finished = True
    finally:
        try:
            stream.close()  # for pipe: this waits for the command and raises on a failed exit status
        except Exception:
            if finished:  # a failed command after a complete read is a truncated shard; on early exit, noise
                raise


def iter_shard(
    url: str,
    counter: SkipCounter,
    *,
    optional: Iterable[str] = (),
    required_extra: Iterable[str] = (),
    optional_window: int = 16,
) -> Iterator[RawSample]:
    """Complete samples of one shard, whatever the member order; defects counted in `counter`.

    Args:
        url: the shard.
        counter: receives skips ("jpg without json", "json without jpg", "missing <ext>", "duplicate member",
            "unreadable shard", "truncated shard").
        optional: more extensions to keep when present. A sample that is complete but still lacks one is held
            back until it arrives or `optional_window` newer complete samples wait behind it (a tar that puts
            `sa_1.clip.npy` far from `sa_1.json` needs `required_extra` instead).
        required_extra: extensions a sample must have besides the image and the json (e.g. "clip.npy").
        optional_window: see `optional`.
    """
    required_extra, optional = tuple(required_extra), tuple(optional)
    wanted = set(IMAGE_EXTENSIONS) | {"json"} | set(required_extra) | set(optional)
    pending: dict[str, dict[str, bytes]] = {}  # incomplete samples
    ready: dict[str, dict[str, bytes]] = {}  # complete, waiting for optional members (insertion ordered)
    members_read = 0
    members = iter_members(url)
    try:
        while True:
            try:
                key, ext, data = next(members)
            except StopIteration:
                break
            # A reading error (missing file, failed pipe, truncated or corrupt tar) costs this shard only. Other
            # exceptions are bugs and propagate: skipping them would silently skip every shard.
            except SHARD_READ_ERRORS as exn:
                reason = "truncated shard" if members_read else "unreadable shard"
                counter.skip(reason, url, None, f"{type(exn).__name__}: {exn}", shared=True)
                pending.clear()  # cut off by the error, not defects of their own
                break
            members_read += 1
            if ext not in wanted:
                continue
            parts = ready.get(key) or pending.setdefault(key, {})
            if ext in parts:
                counter.skip("duplicate member", url, key, f"second {key}.{ext} ignored", shared=True)
                continue
            parts[ext] = data
            if key in ready:
                if all(e in parts for e in optional):
                    yield RawSample(url=url, key=key, members=ready.pop(key))
                continue
            if (
                "json" in parts
                and any(e in parts for e in IMAGE_EXTENSIONS)
                and all(e in parts for e in required_extra)
            ):
                if all(e in parts for e in optional):
                    yield RawSample(url=url, key=key, members=pending.pop(key))
                else:
                    ready[key] = pending.pop(key)
                    while len(ready) > optional_window:
                        oldest = next(iter(ready))
                        yield RawSample(url=url, key=oldest, members=ready.pop(oldest))
    finally:
        members.close()  # closes the file or pipe now, also when the consumer stops early
    for key, parts in ready.items():
        yield RawSample(url=url, key=key, members=parts)
    for key, parts in pending.items():
        counter.skip(
            _incomplete_reason(parts, required_extra), url, key, f"members {sorted(parts)}", shared=True
        )


def _incomplete_reason(parts: dict[str, bytes], required_extra: tuple[str, ...]) -> str:
    has_image = any(e in parts for e in IMAGE_EXTENSIONS)
    if has_image and "json" not in parts:
        return "jpg without json"
    if "json" in parts and not has_image:
        return "json without jpg"
    if has_image:
        missing = [e for e in required_extra if e not in parts]
        return f"missing {missing[0]}"
    return "orphan member"
