"""Notice when the config file, or a file it names, changes, without a signal.

Kubernetes updates a mounted Secret by writing a new timestamped folder and
swapping the `..data` symlink to it; the paths the config names stay the
same. Polling ``os.stat`` (which follows symlinks: a swap changes the inode)
plus a hash of the content catches that, an in-place rewrite, and a
`mv new old` rotation alike. The files are small PEM files, so reading them
every few seconds costs next to nothing.

The proxy compares against the snapshot taken just before it last read the
files, so a change that lands while files are being loaded is never missed,
and a reload that failed on a half-written file is retried once the writer
finishes (that is a change), never in a tight loop.

The config file itself is watched too, when the proxy was started from one: a change to it reloads the whole
config (docs/architecture.md, "Reload"), as SIGHUP does. So is every file that the config names, and after a
reload that failed, every file that the refused config named as well: a config that names a certificate not
written yet is retried once it appears.

A file that cannot be read because the process is out of descriptors or
memory says nothing about the file: ``snapshot`` raises ``OutOfResources``
instead of recording it as changed, and the caller tries again later.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from proxy.config.schema import Config

Snapshot = tuple[tuple[str, object], ...]

# Errors that belong to the process, not to the file.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class OutOfResources(Exception):
    """A watched file could not be read for want of descriptors or memory; try again later."""


def watched_paths(config: Config, config_path: Path | None = None) -> list[Path]:
    """The config file (if given) first, then every file its listeners name, each once."""
    paths: list[Path] = [] if config_path is None else [config_path]
    for listener in config.listeners:
        auth = listener.client_auth
        for path in (listener.tls.cert, listener.tls.key, auth.trusted_ca, auth.advertised_ca, auth.crl):
            if path is not None and path not in paths:
                paths.append(path)
    return paths


def union(*lists: Iterable[Path]) -> list[Path]:
    """The paths of every list, each once, in the order first seen."""
    out: list[Path] = []
    for paths in lists:
        out += [path for path in paths if path not in out]
    return out


def _state_of(path: Path) -> object:
    try:
        st = os.stat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise OutOfResources(f"cannot read {path}: {exc.strerror}") from None
        return f"unreadable: {exc.strerror}"
    return (st.st_ino, st.st_mtime_ns, st.st_size, digest)


def snapshot(paths: Iterable[Path]) -> Snapshot:
    """The state of every path; OutOfResources if the process cannot read them right now."""
    return tuple((str(path), _state_of(path)) for path in paths)


def subset(taken: Snapshot, paths: Iterable[Path]) -> Snapshot:
    """The entries of ``taken`` for ``paths``, in their order (each must be in ``taken``)."""
    states = dict(taken)
    return tuple((str(path), states[str(path)]) for path in paths)


def changed(old: Snapshot, new: Snapshot) -> list[str]:
    """The paths whose state differs between two snapshots of the same paths."""
    return [path for (path, before), (_, after) in zip(old, new, strict=False) if before != after]
