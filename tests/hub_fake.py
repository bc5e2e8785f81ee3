"""A tiny local stand-in for the Hub's write API, enough for ``HfApi.create_repo`` + ``HfApi.create_commit``
(huggingface_hub 2.x), so push code is tested over real HTTP without network access.

Endpoints answered (as huggingface_hub builds them, see ``hf_api.py`` / ``_commit_api.py``):

- ``POST /api/repos/create`` → ``{"url": ...}`` (409 if the repo exists: ``exist_ok=True`` accepts that);
- ``POST /api/validate-yaml`` → the README front matter parsed with ``huggingface_hub.ModelCard``; 400 with
  ``errors`` when it does not parse (as the Hub rejects bad metadata);
- ``POST /api/models/<repo>/preupload/<rev>`` → every file ``uploadMode: "regular"``, so the commit inlines the
  content (base64) instead of going through LFS / Xet;
- ``POST /api/models/<repo>/commit/<rev>`` → the NDJSON commit is decoded and its files stored per repo.

Everything else is answered 404 and recorded, so a test sees any request it did not expect.

Usage::

    with FakeHub() as hub:
        api = HfApi(endpoint=hub.url, token="hf_fake")
        ...
        hub.files("me/repo")        # {path: bytes} of the last state of the repo
        hub.requests                # [(method, path, headers, body)]
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.preuploads: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        return dict(self.repos.get(repo_id, {}))

    def materialise(self, repo_id: str, folder: Path) -> Path:
        """Write the repo's files to ``folder`` (what a ``snapshot_download`` of it would give)."""
        for path, data in self.repos[repo_id].items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return folder

    def paths(self) -> list[str]:
        return [f"{m} {p}" for m, p, _, _ in self.requests]

    # ------------------------------------------------------------------------------------------ the handler

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers), b""))
                self._send(404, {"error": f"not emulated: GET {self.path}"})

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, dict(self.headers), b""))
                self.send_response(404)
                self.end_headers()

            def do_POST(self):
                body = self._body()
                path = self.path.split("?", 1)[0]
                hub.requests.append(("POST", self.path, dict(self.headers), body))
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._validate(json.loads(body))
                parts = path.strip("/").split("/")
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self._send(404, {"error": f"Repository {repo_id} not found"})
                    if parts[4] == "preupload":
                        return self._preupload(repo_id, json.loads(body))
                    return self._commit(repo_id, body)
                return self._send(404, {"error": f"not emulated: POST {self.path}"})

            def _create(self, payload: dict):
                repo_id = f"{payload.get('organization')}/{payload['name']}"
                if repo_id in hub.repos:  # the Hub's 409 also carries the url, which create_repo(exist_ok=True) reads
                    return self._send(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                hub.repos[repo_id] = {}
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _validate(self, payload: dict):
                from huggingface_hub import ModelCard

                try:
                    card = ModelCard(payload["content"], ignore_metadata_errors=False)
                    if not card.data.to_dict():
                        raise ValueError("empty metadata")
                except Exception as exc:  # noqa: BLE001 - any parse failure is a 400, as on the Hub
                    return self._send(400, {"errors": [{"message": str(exc)}], "warnings": []})
                return self._send(200, {"errors": [], "warnings": []})

            def _preupload(self, repo_id: str, payload: dict):
                hub.preuploads.append({"repo": repo_id, "files": [f["path"] for f in payload["files"]]})
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in payload["files"]
                ]
                return self._send(200, {"files": files, "commitOid": "0" * 40})

            def _commit(self, repo_id: str, body: bytes):
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files, other = {}, []
                for item in lines:
                    if item["key"] == "file":
                        assert item["value"]["encoding"] == "base64"
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] != "header":
                        other.append(item)
                hub.commits.append({"repo": repo_id, "header": header, "files": files, "other": other})
                hub.repos[repo_id].update(files)
                oid = hashlib.sha1(body).hexdigest()
                return self._send(
                    200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
                )

        return Handler
