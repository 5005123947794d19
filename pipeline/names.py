"""How kdpipe names things, with no heavy imports (readers of the cache use it): the key of a
tar member (WebDataset's rule) and the name of an input shard's output."""

from __future__ import annotations

import posixpath

SHARD_EXTENSIONS = (".tar", ".parquet")


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc.flac' -> ('dir/abc', 'flac'); WebDataset keys end at the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def shard_name(uri: str) -> str:
    """Output name of an input shard: its file name without the extension."""
    base = posixpath.basename(uri.rstrip("/"))
    for ext in SHARD_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def unique_shard_names(uris: list[str], taken: dict[str, str] | None = None) -> dict[str, str]:
    """{uri: name}; names are file stems, prefixed with parent folders only where two collide.

    taken: {name: uri} already used in the run directory; a new uri never gets one of those
    names, and a uri found there keeps its name.
    """
    taken = dict(taken or {})
    by_uri = {u: n for n, u in taken.items()}
    new = [u for u in uris if u not in by_uri]
    names = {u: shard_name(u) for u in new}
    depth = 1

    def clashes() -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in list(names.values()) + list(taken):
            counts[n] = counts.get(n, 0) + 1
        return counts

    while any(c > 1 for c in clashes().values()) and depth < 16:
        depth += 1
        counts = clashes()
        for u in new:
            if counts[names[u]] > 1:
                parts = u.rstrip("/").split("/")
                names[u] = "__".join(parts[-depth:-1] + [shard_name(u)])
    if any(c > 1 for c in clashes().values()):
        raise ValueError("input shards have names that cannot be told apart")
    return {u: by_uri.get(u) or names[u] for u in uris}
