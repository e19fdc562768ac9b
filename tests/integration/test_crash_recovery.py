"""kill -9 of a real server at each point of an upload; the restart repairs what it left.

The server is started with one failpoint armed (``LORAPLEX_FAILPOINTS``, server/failpoints.py):
the upload stops there, the test sees the server log the point, and SIGKILLs the server and
its engine processes. The next start (arming the next point) must leave no half-registered
adapter and no file that no adapter refers to, and an adapter uploaded before the crashes
must give the same greedy output as before. benchmarks/crash_repeats.py repeats this.
"""

from __future__ import annotations

import pytest

from benchmarks.crash_repeats import run
from server.failpoints import POINTS
from tests.integration.conftest import _start_cluster


@pytest.fixture(scope="module")
def crashy(tiny_base, adapter_dirs, tmp_path_factory):
    c = _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, "--max-loras", "2", name="crashy")
    yield c
    if c.server.proc.poll() is None:
        c.server.stop()


def test_kill_9_at_every_point_of_an_upload_leaves_nothing_half_done(crashy):
    report = run(crashy, "alice", crashy.adapters["a3"], POINTS, repeats=1)
    assert report.kills == len(POINTS) == len(report.checks)
    for check in report.checks:
        assert check["staging_leftovers"] == [] and check["orphan_blobs"] == [], check
        assert check["missing_blobs"] == [] and not check["half_registered"], check
        assert not check["keeper_changed"], check
    logs = {c["phase"]: " ".join(c["recovery_log"]) for c in report.checks}
    assert "removed leftover staging directory" in logs["upload.body"]
    assert "removed adapter blob" in logs["upload.blob_stored"]
    assert "removed adapter blob" in logs["registry.before_commit"]
    assert logs["upload.committed"] == ""  # a committed upload leaves nothing to repair
    assert (report.half_registered, report.orphan_files, report.keeper_changed) == (0, 0, 0)
