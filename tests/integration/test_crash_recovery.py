"""kill -9 of a real server at each point of an upload; the restart repairs what it left.

The server is started with one failpoint armed (``LORAPLEX_FAILPOINTS``, server/failpoints.py):
the upload stops there, the test sees the server log the point, and SIGKILLs the server and
its engine processes. The next start (arming the next point) must leave no half-registered
adapter and no file that no adapter refers to, and an adapter uploaded before the crashes
must give the same greedy output as before.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from server.failpoints import POINTS
from tests.integration.conftest import _start_cluster


@pytest.fixture(scope="module")
def crashy(tiny_base, adapter_dirs, tmp_path_factory):
    c = _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, "--max-loras", "2", name="crashy")
    yield c
    if c.server.proc.poll() is None:
        c.server.stop()


def greedy(c, model: str) -> list[int]:
    r = c.client("alice").completions.create(model=model, prompt="the date is march", max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
    return r.choices[0].model_extra["token_ids"]


def on_disk(c) -> tuple[set[str], list[str]]:
    root = c.server.data_dir / "adapters"
    return {p.name for p in (root / "sha256").iterdir()}, sorted(p.name for p in (root / ".staging").iterdir())


def registry(c) -> tuple[set[str], set[tuple[str, int, str]]]:
    from server.db import Database

    db = Database.in_data_dir(c.server.data_dir)
    try:
        digests = {r[0] for r in db.query("SELECT DISTINCT digest FROM adapters")}
        rows = {(r[0], r[1], r[2]) for r in db.query("SELECT name, version, status FROM adapters WHERE tenant='alice'")}
    finally:
        db.close()
    return digests, rows


def upload_and_die(c, phase: str, name: str) -> None:
    """Upload ``name`` on a server armed at ``phase``; SIGKILL it once it gets there."""
    d = c.adapters["a3"]
    files = [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]
    mark = c.server.log_size()

    def send():
        try:
            with c.http("alice") as h:
                h.post("/v1/adapters", data={"name": name}, files=files)
        except httpx.HTTPError:
            pass  # the server died under it

    t = threading.Thread(target=send)
    t.start()
    c.server.wait_for_log(f"failpoint {phase} reached", since=mark)
    c.server.kill9()
    t.join(timeout=60)


def test_kill_9_at_every_point_of_an_upload_leaves_nothing_half_done(crashy):
    c = crashy
    assert c.upload("alice", "keeper", "a2").status_code == 201
    want = greedy(c, "tiny:keeper")
    c.server.stop()
    for i, phase in enumerate(POINTS):
        c.server.env = {"LORAPLEX_FAILPOINTS": phase}
        mark = c.server.log_size()
        c.server.start()
        if i:
            check_recovered(c, POINTS[i - 1], f"victim-{i - 1}", want, since=mark)
        upload_and_die(c, phase, f"victim-{i}")
    c.server.env = {}
    mark = c.server.log_size()
    c.server.start()
    check_recovered(c, POINTS[-1], f"victim-{len(POINTS) - 1}", want, since=mark)


def check_recovered(c, phase: str, victim: str, want: list[int], *, since: int) -> None:
    live, rows = registry(c)
    blobs, staging = on_disk(c)
    assert staging == [], f"after a kill at {phase}: staging leftovers {staging}"
    assert blobs == live, f"after a kill at {phase}: orphan blobs {blobs - live}, missing {live - blobs}"
    names = {name for name, _, _ in rows}
    with c.http("alice") as h:
        listed = {a["id"] for a in h.get("/v1/adapters").json()["data"]}
    assert listed == names  # the API and the registry agree: nothing half-registered
    if phase == "upload.committed":  # the row was committed: the adapter survived, whole
        assert victim in names and greedy(c, f"tiny:{victim}")
    else:
        assert victim not in names, f"after a kill at {phase}: {victim} is half-registered"
    assert greedy(c, "tiny:keeper") == want, f"after a kill at {phase}: keeper's output changed"
    log = c.server.log_path.read_bytes()[since:].decode(errors="replace")
    if phase == "upload.body":
        assert "recovery: removed leftover staging directory" in log
    if phase in ("upload.blob_stored", "registry.before_commit"):
        assert "recovery: removing adapter blob" in log
