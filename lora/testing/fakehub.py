"""A loopback stand-in for the Hugging Face Hub API, for tests and demos.

The real ``huggingface_hub`` client (``HfApi(endpoint=hub.url)``) talks to it unchanged:
``create_repo`` and ``upload_folder`` make exactly these calls (huggingface_hub 2.x with
``HF_HUB_DISABLE_XET=1``):

1. ``POST /api/repos/create`` → ``{"url"}`` (409 still carries ``url``);
2. ``POST /api/validate-yaml`` → ``{}`` (model card front matter);
3. ``POST /api/models/{repo}/preupload/{rev}`` → upload mode per file;
4. ``POST /{repo}.git/info/lfs/objects/batch`` → an upload href per object, then ``PUT`` the bytes;
5. ``POST /api/models/{repo}/commit/{rev}`` (NDJSON) → ``{"commitOid", "commitUrl"}``;
plus ``GET /api/models/{repo}`` (repo info, which ``create_repo(exist_ok=True)`` asks after a 403).

What it received is kept for assertions: ``files[repo][path] -> bytes`` (committed files),
``authorizations`` (every Authorization header value), ``requests`` (method, path, headers
with lower-case names, body size).
Switches: ``valid_tokens`` (anything else gets 401), ``foreign_repos`` (repos owned by someone
else: create answers ``foreign_status`` 403 or 409, uploads answer 403).

Xet storage cannot be imitated by a small server, so starting a FakeHub turns Xet off in the
client (``HF_HUB_DISABLE_XET``) for the process and restores it on stop.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

DEFAULT_USER = "user"
_BINARY_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".webp", ".bin", ".pt", ".ckpt",
                    ".gif", ".zip")
_LFS_THRESHOLD = 10 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    # -- plumbing ----------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet by default)
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _record(self, body: bytes) -> None:
        hub = self.server.hub
        with hub.lock:
            hub.requests.append({"method": self.command, "path": self.path,
                                 "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "size": len(body)})
            auth = self.headers.get("Authorization")
            if auth is not None:
                hub.authorizations.append(auth)

    def _authorized(self) -> bool:
        """401 unless a Bearer token is sent and (when configured) is a valid one."""
        hub = self.server.hub
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token and (hub.valid_tokens is None or token in hub.valid_tokens):
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    # -- routing -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        body = self._body()
        self._record(body)
        path = urlsplit(self.path).path
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(body)
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(200, {})
            if method == "PUT" and path.startswith("/_lfs/"):
                return self._lfs_put(path[len("/_lfs/"):], body)
            match = re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path)
            if method == "POST" and match:
                return self._lfs_batch(unquote(match.group(1)), body)
            match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
            if method == "POST" and match:
                repo = unquote(match.group(1))
                if match.group(2) == "preupload":
                    return self._preupload(repo, body)
                return self._commit(repo, body)
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
            if method == "GET" and match:
                return self._repo_info(unquote(match.group(1)))
        except (ValueError, KeyError) as exc:
            return self._error(400, f"bad request: {exc}")
        self._error(404, f"fake hub: no route for {method} {path}")

    # -- endpoints -------------------------------------------------------------------------
    def _create_repo(self, body: bytes) -> None:
        hub = self.server.hub
        if not self._authorized():
            return
        payload = json.loads(body or b"{}")
        name = payload["name"]
        repo = f"{payload.get('organization') or DEFAULT_USER}/{name}"
        url = f"{hub.url}/{repo}"
        if repo in hub.foreign_repos:
            if hub.foreign_status == 409:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            owner = repo.split("/")[0]
            return self._error(403, f"You don't have the rights to create a model under the "
                                    f"namespace \"{owner}\"")
        with hub.lock:
            exists = repo in hub.repos
            if not exists:
                hub.repos[repo] = {"private": payload.get("visibility") == "private"
                                   or bool(payload.get("private")), "sha": "0" * 40}
                hub.files.setdefault(repo, {})
        if exists:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self._send(200, {"url": url, "name": repo})

    def _repo_info(self, repo: str) -> None:
        hub = self.server.hub
        if repo in hub.foreign_repos:  # someone else's public repo: visible, not writable
            return self._send(200, {"id": repo, "modelId": repo, "private": False,
                                    "sha": "f" * 40, "siblings": []})
        if not self._authorized():
            return
        info = hub.repos.get(repo)
        if info is None:
            return self._error(404, "Repository not found", code="RepoNotFound")
        self._send(200, {"id": repo, "modelId": repo, "private": info["private"],
                         "sha": info["sha"],
                         "siblings": [{"rfilename": p} for p in hub.files.get(repo, {})]})

    def _writable(self, repo: str) -> bool:
        hub = self.server.hub
        if not self._authorized():
            return False
        if repo in hub.foreign_repos:
            self._error(403, f"You don't have write access to {repo}: it belongs to another user")
            return False
        if repo not in hub.repos:
            self._error(404, "Repository not found", code="RepoNotFound")
            return False
        return True

    def _preupload(self, repo: str, body: bytes) -> None:
        if not self._writable(repo):
            return
        files = json.loads(body)["files"]
        answer = []
        for item in files:
            sample = base64.b64decode(item.get("sample") or "")
            path = item["path"]
            lfs = (path.lower().endswith(_BINARY_SUFFIXES) or b"\x00" in sample
                   or int(item.get("size") or 0) > _LFS_THRESHOLD)
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False})
        self._send(200, {"files": answer, "commitOid": self.server.hub.repos[repo]["sha"]})

    def _lfs_batch(self, repo: str, body: bytes) -> None:
        hub = self.server.hub
        if not self._writable(repo):
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in hub.lfs:  # already stored objects need no upload, as on the Hub
                entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/{oid}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        hub = self.server.hub
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"sha256 of the uploaded bytes does not match {oid}")
        with hub.lock:
            hub.lfs[oid] = body
        self._send(200, {})

    def _commit(self, repo: str, body: bytes) -> None:
        hub = self.server.hub
        if not self._writable(repo):
            return
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise ValueError(f"unsupported encoding {value.get('encoding')}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} "
                                            "was never uploaded")
                added[value["path"]] = hub.lfs[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise ValueError(f"unknown commit line {key!r}")
        oid = hashlib.sha1(body + str(time.time_ns()).encode()).hexdigest()
        with hub.lock:
            stored = hub.files.setdefault(repo, {})
            for path in deleted:
                for name in [p for p in stored if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del stored[name]
            stored.update(added)
            hub.repos[repo]["sha"] = oid
            hub.commits.append({"repo": repo, "oid": oid, "summary": header.get("summary"),
                                "description": header.get("description"),
                                "files": sorted(added), "deleted": deleted})
        self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                         "success": True})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "FakeHub"


class FakeHub:
    """The Hub API on ``127.0.0.1:<free port>``; use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        valid_tokens: Iterable[str] | None = None,
        foreign_repos: Iterable[str] = (),
        foreign_status: int = 403,
        port: int = 0,
        verbose: bool = False,
    ) -> None:
        if foreign_status not in (403, 409):
            raise ValueError("foreign_status must be 403 or 409")
        self.valid_tokens = set(valid_tokens) if valid_tokens is not None else None
        self.foreign_repos = set(foreign_repos)
        self.foreign_status = foreign_status
        self.verbose = verbose
        self.port = port
        self.lock = threading.Lock()
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._xet_saved: tuple[str | None, bool] | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._disable_xet()
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._restore_xet()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _disable_xet(self) -> None:
        try:
            from huggingface_hub import constants
        except ImportError:  # pragma: no cover - the server itself needs no client
            return
        self._xet_saved = (os.environ.get("HF_HUB_DISABLE_XET"), constants.HF_HUB_DISABLE_XET)
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        constants.HF_HUB_DISABLE_XET = True

    def _restore_xet(self) -> None:
        if self._xet_saved is None:
            return
        from huggingface_hub import constants

        env, const = self._xet_saved
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_XET", None)
        else:
            os.environ["HF_HUB_DISABLE_XET"] = env
        constants.HF_HUB_DISABLE_XET = const
        self._xet_saved = None


def main(argv: list[str] | None = None) -> int:
    """``python -m lora.testing.fakehub --port 8765``: serve until interrupted (demos)."""
    parser = argparse.ArgumentParser(description="loopback Hugging Face Hub API stand-in")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", help="accept only these tokens")
    args = parser.parse_args(argv)
    hub = FakeHub(port=args.port, valid_tokens=args.token, verbose=True).start()
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
