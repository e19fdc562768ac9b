"""Named points where a test can stop a real server, to kill it there (``kill -9``).

    LORAPLEX_FAILPOINTS=upload.blob_stored python -m server ...

An armed point logs ``failpoint <name> reached`` and then blocks the thread
that reached it forever; the test waits for that line and kills the process,
so the crash happens exactly there. Unarmed points cost one set lookup. The
points, in the order an upload passes them:

- ``upload.body``: the upload's bytes are arriving in the staging directory;
- ``upload.blob_stored``: the blob is in the store, no row refers to it yet;
- ``registry.before_commit``: the row is written, its transaction not committed;
- ``upload.committed``: the row is committed, the response not sent.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

ENV = "LORAPLEX_FAILPOINTS"
POINTS = ("upload.body", "upload.blob_stored", "registry.before_commit", "upload.committed")
_armed = frozenset(p for p in os.environ.get(ENV, "").split(",") if p)
if unknown := _armed - set(POINTS):
    raise SystemExit(f"{ENV}: unknown failpoint(s) {', '.join(sorted(unknown))}; known: {', '.join(POINTS)}")


def hit(name: str) -> None:
    if name not in _armed:
        return
    logger.warning("failpoint %s reached; blocking here until killed", name)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    threading.Event().wait()
