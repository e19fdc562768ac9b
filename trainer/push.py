"""Upload an adapter directory to a running loraplex server (POST /v1/adapters, or PUT to replace)."""

from __future__ import annotations

from pathlib import Path

UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "loraplex.json")


class PushError(RuntimeError):
    pass


def push(adapter: Path, *, url: str, key: str, name: str, replace: bool = False, tenant: str | None = None) -> dict:
    import httpx

    missing = [f for f in UPLOADED[:2] if not (adapter / f).is_file()]
    if missing:
        raise PushError(f"ADAPTER {str(adapter)!r}: missing {', '.join(missing)}")
    files = [("files", (f, (adapter / f).read_bytes())) for f in UPLOADED if (adapter / f).is_file()]
    data = {"tenant": tenant} if tenant else {}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as h:
            r = h.post("/v1/adapters", data={"name": name, **data}, files=files)
            if r.status_code == 409 and replace:
                r = h.put(f"/v1/adapters/{name}", data=data, files=files)
    except httpx.HTTPError as e:
        raise PushError(f"--url {url}: {e}") from None
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            msg = err["message"] + (f" (field: {err['param']})" if err.get("param") else "")
        except Exception:
            msg = r.text
        hint = " (pass --replace to upload a new version)" if r.status_code == 409 else ""
        raise PushError(f"server refused the adapter ({r.status_code}): {msg}{hint}")
    return r.json()
