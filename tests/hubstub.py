"""A loopback stand-in of the Hugging Face Hub's HTTP API, for tests (127.0.0.1, threaded).

It implements what the installed ``huggingface_hub`` (2.4) calls when ``sft`` pushes, and
nothing more: ``whoami-v2``, repo create, model info, branch create, ``paths-info``,
``preupload``, ``validate-yaml``, the LFS batch API with "basic" PUT uploads, and the NDJSON
``commit`` endpoint. The client under test is the real ``huggingface_hub``, pointed here
through ``HF_ENDPOINT``; Xet storage is a separate protocol, so clients run with
``HF_HUB_DISABLE_XET=1`` and upload through LFS.

State is kept in memory and read by the tests directly: ``hub.repos[repo_id]`` holds each
branch's files as bytes, ``hub.lfs`` the LFS objects received, ``hub.log`` every request as
``(method, path)``. ``hub.cut_commit(repo_id)`` drops the connection of the next commit to
that repo after reading it (no response: what a network cut looks like to the client).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubStub", "Repo"]

#: Files the real Hub stores through LFS whatever their size (its default .gitattributes).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".model", ".zip")
#: Text files at least this large go through LFS as well.
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(default_factory=list)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.branches[revision]

    def card(self, revision: str = "main") -> dict[str, Any]:
        """The README's YAML front matter, as the Hub parses it."""
        text = self.files(revision).get("README.md", b"").decode()
        if not text.startswith("---"):
            return {}
        return yaml.safe_load(text.split("---", 2)[1]) or {}


class HubStub:
    """The loopback Hub. ``tokens`` maps access tokens to (user, role); ``orgs`` the user's organizations."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None, orgs: tuple[str, ...] = ()):
        self.tokens = tokens or {}
        self.orgs = orgs
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self._cut: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubStub":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- test controls ---------------------------------------------------------------------------
    def cut_commit(self, repo_id: str) -> None:
        """The next commit to ``repo_id`` is read, not applied, and its connection closed without a response."""
        self._cut.add(repo_id)

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """A repo someone made by other means (not through sft)."""
        repo = self.repos[repo_id] = Repo(repo_id, private)
        repo.files().update(files)
        return repo

    def requests(self, method: str, contains: str = "") -> list[str]:
        return [path for m, path in self.log if m == method and contains in path]


def _handler(hub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the tests read hub.log
            pass

        # -- plumbing ---------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _user(self) -> tuple[str, str] | None:
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            hub.authorizations.append(token or "")
            return hub.tokens.get(token) if token else None

        def _writable(self, namespace: str) -> bool:
            user = self._user()
            return user is not None and user[1] == "write" and (namespace == user[0] or namespace in hub.orgs)

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            user = self._user()
            if repo is None or (repo.private and (user is None or not self._readable(repo_id))):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if write and not self._writable(repo_id.split("/")[0]):
                self._error(403, "You don't have the rights to write to this repo")
                return None
            return repo

        def _readable(self, repo_id: str) -> bool:
            user = self._user()
            return user is not None and (repo_id.split("/")[0] == user[0] or repo_id.split("/")[0] in hub.orgs)

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log.append((method, path))
            body = self._body() if method in ("POST", "PUT") else b""
            parts = path.strip("/").split("/")
            with hub._lock:
                if method == "GET" and path == "/api/whoami-v2":
                    return self._whoami()
                if method == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(body))
                if method == "POST" and path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if method == "PUT" and parts[0] == "lfs-upload":
                    return self._lfs_put(parts[1], body)
                if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                    return self._lfs_batch(path[1:-len(".git/info/lfs/objects/batch")], json.loads(body))
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    rest = parts[4:]
                    if method == "GET" and not rest:
                        return self._info(repo_id, "main")
                    if method == "GET" and rest[0] == "revision":
                        return self._info(repo_id, "/".join(rest[1:]))
                    if method == "POST" and rest[0] == "preupload":
                        return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body))
                    if method == "POST" and rest[0] == "paths-info":
                        return self._paths_info(repo_id, "/".join(rest[1:]), parse_qs(body.decode()))
                    if method == "POST" and rest[0] == "commit":
                        return self._commit(repo_id, "/".join(rest[1:]), body)
                    if method == "POST" and rest[0] == "branch":
                        return self._branch(repo_id, "/".join(rest[1:]))
            self._error(404, f"the stub does not implement {method} {path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        # -- endpoints --------------------------------------------------------------------------
        def _whoami(self) -> None:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            name, role = user
            self._send(200, {"type": "user", "name": name, "fullname": name.title(),
                             "orgs": [{"name": org, "roleInOrg": "write"} for org in hub.orgs],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

        def _create(self, payload: dict[str, Any]) -> None:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            namespace = payload.get("organization") or user[0]
            repo_id = f"{namespace}/{payload['name']}"
            if not self._writable(namespace):
                return self._error(403, f"You don't have the rights to create a model under {namespace}")
            if repo_id in hub.repos:
                return self._error(409, "You already created this model repo")
            hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if revision not in repo.branches:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            files = repo.files(revision)
            self._send(200, {"id": repo_id, "author": repo_id.split("/")[0], "private": repo.private,
                             "sha": repo.commits[-1]["oid"] if repo.commits else "0" * 40,
                             "cardData": repo.card(revision) or None, "tags": repo.card(revision).get("tags", []),
                             "siblings": [{"rfilename": name} for name in sorted(files)]})

        def _branch(self, repo_id: str, branch: str) -> None:
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            repo.branches[branch] = dict(repo.files("main"))
            self._send(200, {})

        def _entry(self, repo: Repo, path: str, data: bytes) -> dict[str, Any]:
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if path in repo.lfs_paths:
                sha = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
                entry.update(oid=git_blob_id(pointer), lfs={"oid": sha, "size": len(data), "pointerSize": len(pointer)})
            else:
                entry["oid"] = git_blob_id(data)
            return entry

        def _paths_info(self, repo_id: str, revision: str, form: dict[str, list[str]]) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if revision not in repo.branches:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            files = repo.files(revision)
            self._send(200, [self._entry(repo, p, files[p]) for p in form.get("paths", []) if p in files])

        def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            files = repo.files(revision) if revision in repo.branches else {}
            out = []
            for f in payload["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_SIZE or b"\0" in sample
                oid = None
                if f["path"] in files:
                    data = files[f["path"]]
                    oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
            self._send(200, {"files": out, "commitOid": repo.commits[-1]["oid"] if repo.commits else None})

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            text = payload["content"]
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else {}
            except yaml.YAMLError as exc:
                return self._send(400, {"error": f"Invalid YAML in README.md: {exc}"})
            if not isinstance(meta, dict):
                return self._send(400, {"error": "README.md metadata must be a mapping"})
            base = meta.get("base_model")
            if base is not None and not (isinstance(base, str) and base.count("/") <= 1 and not base.startswith("/")):
                return self._send(400, {"error": f'"base_model" must be a Hub model id, got {base!r}'})
            self._send(200, {"errors": [], "warnings": []})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if self._repo(repo_id, write=True) is None:
                return
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:  # already stored: no action, the client skips the upload
                    entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str, data: bytes) -> None:
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "the uploaded bytes do not match the announced sha256")
            hub.lfs[oid] = data
            self._send(200)

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            if repo_id in hub._cut:
                hub._cut.discard(repo_id)
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the connection drop, no response
                return
            if revision not in repo.branches:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"]
            staged = dict(repo.files(revision))
            lfs_paths = set(repo.lfs_paths)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    staged[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, f"LFS object {value['oid']} was never uploaded")
                    staged[value["path"]] = hub.lfs[value["oid"]]
                    lfs_paths.add(value["path"])
                elif line["key"] == "deletedFile":
                    staged.pop(value["path"], None)
                else:
                    return self._error(400, f"the stub does not implement commit key {line['key']}")
            oid = uuid.uuid4().hex + uuid.uuid4().hex[:8]
            repo.branches[revision] = staged
            repo.lfs_paths = lfs_paths
            repo.commits.append({"oid": oid, "revision": revision, "summary": header.get("summary"),
                                 "paths": [line["value"]["path"] for line in lines[1:]]})
            self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "success": True, "pullRequestUrl": None})

    return Handler
