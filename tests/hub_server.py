"""A loopback Hugging Face Hub for tests: speaks what ``HfApi`` (huggingface_hub 2.x, with
``HF_HUB_DISABLE_XET=1``) sends for create_repo / create_branch / create_commit / repo_info.

Plain LFS only: preupload decides "lfs" (by file type, size or binary sample) or "regular"; the
LFS batch API answers a basic-transfer upload action (a PUT URL on this server, plus a verify
URL) for objects it does not have and no action for those it has; PUT bodies are stored by
sha256 after checking the hash; the commit endpoint reads the NDJSON (header, file, lfsFile)
and applies it to a branch, or to a new ``refs/pr/N`` with ``?create_pr=1``.

Every request is recorded (method, path with query, headers without Authorization, body size
and body) in ``server.requests`` so tests can assert what was (not) sent. ``reject_tokens``
answers 401 for those tokens; ``required_token`` (if set) is the only token accepted.

    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".npy", ".npz", ".ckpt", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files over 10 MB through LFS whatever their type


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names, Authorization removed
    body_size: int
    body: bytes
    authorized: bool  # whether an Authorization header was present (its value is never kept)
    status: int = 0


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:  # what preupload reports as the remote oid (compared with the client's local oid)
        return self.sha256 if self.lfs else git_blob_oid(self.content)


@dataclass
class Commit:
    oid: str
    ref: str
    summary: str
    files: dict[str, StoredFile]
    pr: int | None = None


@dataclass
class Repo:
    id: str
    private: bool
    refs: dict[str, dict[str, StoredFile]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=dict)  # ref -> commit oid
    commits: list[Commit] = field(default_factory=list)
    prs: list[int] = field(default_factory=list)


class HubServer:
    """The state and the HTTP server (127.0.0.1, random port, daemon thread)."""

    def __init__(self, reject_tokens: tuple[str, ...] = (), required_token: str | None = None):
        self.reject_tokens = set(reject_tokens)
        self.required_token = required_token
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # sha256 -> content (the LFS store)
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._n = 0
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # queries for tests
    def files(self, repo: str, ref: str = "main") -> dict[str, StoredFile]:
        return self.repos[repo].refs[ref]

    def requests_matching(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def lfs_puts(self) -> list[Request]:
        return self.requests_matching("PUT", r"^/lfs-objects/")

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def _new_oid(self) -> str:
        self._n += 1
        return hashlib.sha1(f"commit-{self._n}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, obj=None, *, ctype: str = "application/json", headers: dict | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._record.status = status

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers)

    def _handle(self, method: str) -> None:
        body = self._body()
        auth = self.headers.get("Authorization")
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
        self._record = Request(method, self.path, headers, len(body), body, auth is not None)
        with self.hub.lock:
            self.hub.requests.append(self._record)
        try:
            self._route(method, body, auth)
        except Exception as e:  # a bug in the fake: make it visible to the client
            self._error(500, f"test server error: {type(e).__name__}: {e}")

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_HEAD(self):
        self._handle("HEAD")

    # ---- auth -------------------------------------------------------------------------------------------
    def _auth_ok(self, auth: str | None) -> bool:
        token = auth.split(" ", 1)[1] if auth and " " in auth else None
        hub = self.hub
        if token is None or token in hub.reject_tokens or (hub.required_token and token != hub.required_token):
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    # ---- routes -----------------------------------------------------------------------------------------
    def _route(self, method: str, body: bytes, auth: str | None) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        hub = self.hub
        m = None

        def match(pattern: str) -> bool:
            nonlocal m
            m = re.fullmatch(pattern, path)
            return m is not None

        if method == "PUT" and match(r"/lfs-objects/([0-9a-f]{64})"):  # presigned-URL style: no auth
            oid = m.group(1)
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, f"sha256 mismatch for object {oid}")
            with hub.lock:
                hub.objects[oid] = body
            return self._send(200, raw=b"", headers={"ETag": f'"{oid[:32]}"'})
        if method == "POST" and match(r"/lfs-verify/([0-9a-f]{64})"):
            req = json.loads(body or b"{}")
            ok = m.group(1) in hub.objects and len(hub.objects[m.group(1)]) == req.get("size")
            return self._send(200, {"ok": True}) if ok else self._error(404, "object not found")
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body)

        if not self._auth_ok(auth):
            return None
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and match(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch"):
            return self._lfs_batch(m.group(1), json.loads(body))
        if method == "POST" and match(r"/api/models/([^/]+/[^/]+)/preupload/(.+)"):
            return self._preupload(m.group(1), m.group(2), json.loads(body), query)
        if method == "POST" and match(r"/api/models/([^/]+/[^/]+)/commit/(.+)"):
            return self._commit(m.group(1), m.group(2), body, query)
        if method == "POST" and match(r"/api/models/([^/]+/[^/]+)/branch/(.+)"):
            return self._branch(m.group(1), m.group(2), json.loads(body or b"{}"))
        if method == "GET" and match(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?"):
            return self._info(m.group(1), m.group(2) or "main")
        if method == "GET" and match(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?"):
            return self._tree(m.group(1), m.group(2), m.group(3) or "")
        if method == "POST" and match(r"/api/models/([^/]+/[^/]+)/paths-info/(.+)"):
            return self._paths_info(m.group(1), m.group(2), body)
        if method in ("GET", "HEAD") and match(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)"):
            return self._resolve(m.group(1), m.group(2), m.group(3))
        return self._error(404, f"no route for {method} {path}")

    def _validate_yaml(self, body: bytes) -> None:
        import yaml

        content = json.loads(body).get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("---", 2)
            try:
                meta = yaml.safe_load(parts[1]) if len(parts) == 3 else None
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._send(400, {"errors": errors, "warnings": []})
        return self._send(200, {"errors": [], "warnings": []})

    def _create_repo(self, req: dict) -> None:
        hub = self.hub
        repo_id = f"{req.get('organization')}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
        with hub.lock:
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                  headers={"X-Error-Message": "You already created this model repo"})
            private = req.get("visibility") == "private" or bool(req.get("private"))
            hub.repos[repo_id] = Repo(repo_id, private)
            repo = hub.repos[repo_id]
            oid = hub._new_oid()
            repo.heads["main"] = oid
            repo.commits.append(Commit(oid, "main", "initial commit", {}))
        return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _ref(self, repo: Repo, rev: str, query: dict) -> str | None:
        rev = unquote(rev)
        if rev not in repo.refs:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return rev

    def _preupload(self, repo_id: str, rev: str, req: dict, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None or (ref := self._ref(repo, rev, query)) is None:
            return None
        existing = repo.refs[ref]
        out = []
        for f in req["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            have = existing.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": have.oid if have is not None and have.lfs == lfs else None})
        return self._send(200, {"files": out, "commitOid": repo.heads.get(ref)})

    def _lfs_batch(self, repo_id: str, req: dict) -> None:
        hub = self.hub
        if self._repo(repo_id) is None:
            return None
        if req.get("operation") != "upload":
            return self._error(400, "only upload is supported")
        objects = []
        for o in req["objects"]:
            oid, size = o["oid"], o["size"]
            if oid in hub.objects:
                objects.append({"oid": oid, "size": size})  # already stored: no action, nothing to send
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{hub.url}/lfs-objects/{oid}", "header": {}},
                    "verify": {"href": f"{hub.url}/lfs-verify/{oid}"}}})
        return self._send(200, {"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict) -> None:
        hub = self.hub
        repo = self._repo(repo_id)
        if repo is None or (ref := self._ref(repo, rev, query)) is None:
            return None
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "commit payload must start with a header line")
        summary = lines[0]["value"].get("summary", "")
        changes: dict[str, StoredFile] = {}
        for ln in lines[1:]:
            key, value = ln["key"], ln["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "file content must be base64")
                changes[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in hub.objects:
                    return self._error(422, f"LFS object {oid} for {value['path']} was never uploaded")
                if value.get("size") is not None and value["size"] != len(hub.objects[oid]):
                    return self._error(422, f"size mismatch for {value['path']}")
                changes[value["path"]] = StoredFile(hub.objects[oid], lfs=True)
            else:
                return self._error(400, f"unsupported commit operation {key}")
        with hub.lock:
            oid = hub._new_oid()
            if query.get("create_pr") == ["1"]:
                num = len(repo.prs) + 1
                repo.prs.append(num)
                target = f"refs/pr/{num}"
                repo.refs[target] = {**repo.refs[ref], **changes}
                repo.heads[target] = oid
                repo.commits.append(Commit(oid, target, summary, changes, pr=num))
                return self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                                        "pullRequestUrl": f"{hub.url}/{repo_id}/discussions/{num}"})
            repo.refs[ref] = {**repo.refs[ref], **changes}
            repo.heads[ref] = oid
            repo.commits.append(Commit(oid, ref, summary, changes))
        return self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "success": True})

    def _branch(self, repo_id: str, branch: str, req: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return None
        branch = unquote(branch)
        start = req.get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.refs:
                return self._error(409, "Reference already exists")
            if start not in repo.refs:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.refs[branch] = dict(repo.refs[start])
            repo.heads[branch] = repo.heads[start]
        return self._send(200, {})

    def _entry(self, path: str, f: StoredFile) -> dict:
        e = {"type": "file", "path": path, "size": len(f.content), "oid": git_blob_oid(f.content)}
        if f.lfs:
            e["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": 134}
        return e

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or (ref := self._ref(repo, rev, {})) is None:
            return None
        files = repo.refs[ref]
        return self._send(200, {
            "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": repo.heads.get(ref),
            "private": repo.private, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p, "size": len(f.content), "blobId": git_blob_oid(f.content),
                          **({"lfs": {"size": len(f.content), "sha256": f.sha256, "pointerSize": 134}} if f.lfs else {})}
                         for p, f in sorted(files.items())]})

    def _tree(self, repo_id: str, rev: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or (ref := self._ref(repo, rev, {})) is None:
            return None
        prefix = prefix.strip("/")
        items = [self._entry(p, f) for p, f in sorted(repo.refs[ref].items())
                 if not prefix or p.startswith(prefix + "/")]
        return self._send(200, items)

    def _paths_info(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None or (ref := self._ref(repo, rev, {})) is None:
            return None
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        files = repo.refs[ref]
        return self._send(200, [self._entry(p, files[p]) for p in paths if p in files])

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self.hub.repos.get(repo_id)
        f = repo.refs.get(unquote(rev), {}).get(path) if repo else None
        if f is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        return self._send(200, raw=f.content, ctype="application/octet-stream",
                          headers={"X-Repo-Commit": repo.heads.get(unquote(rev), ""), "ETag": f'"{f.oid}"'})
