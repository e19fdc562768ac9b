"""A base's fingerprint is hashed once per set of weight files, across processes (an 8B-70B base
takes minutes to hash): cached on disk, keyed by the files' sizes and mtimes."""

from __future__ import annotations

import json
import os

from trainer import base


def test_the_fingerprint_is_cached_on_disk_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    from tests.tiny import make_tiny_llama

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = make_tiny_llama(tmp_path / "model")
    real = base.fingerprint(model)
    (entry,) = (tmp_path / "cache" / "loraplex" / "fingerprints").iterdir()
    record = json.loads(entry.read_text())
    assert record["fingerprint"] == real and record["path"] == str(model.resolve())
    # A later process reads the cache instead of hashing: a planted value comes back as it is.
    base._fingerprint_cached.cache_clear()
    entry.write_text(json.dumps({**record, "fingerprint": "planted"}))
    assert base.fingerprint(model) == "planted"
    # A weight file that changes (its mtime here) is hashed again.
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert base.fingerprint(model) == real
    assert json.loads(entry.read_text())["fingerprint"] == real
