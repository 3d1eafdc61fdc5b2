"""A local stand-in for the Hugging Face Hub HTTP API: only what `medtune.hub` calls.

The Hub cannot be reached from here, so tests point `hub.endpoint` at this server and assert exactly what
would have been pushed. It implements repo creation, refs, preupload (every file "regular", so contents
arrive inline in the commit), commits (NDJSON) and tags, and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from http.server import BaseHTTPRequestHandler

import yaml

from standin import LoopbackServer

REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class HubStandIn(LoopbackServer):
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.validated: list[dict] = []  # model card metadata checked by /api/validate-yaml
        self.fail_next: dict[str, int] = {}  # route name -> HTTP status to answer once
        self._serve(self._handler())

    def _repo(self, repo_id: str) -> dict:
        return self.repos.setdefault(repo_id, {"files": {}, "commits": [], "tags": {}, "private": None})

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                hub.requests.append((method, self.path, dict(self.headers)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                routes = [
                    ("POST", r"/api/repos/create$", "create", self.create),
                    ("POST", r"/api/validate-yaml$", "validate", self.validate_yaml),
                    ("GET", REPO + r"/refs(\?.*)?$", "refs", self.refs),
                    ("POST", REPO + r"/preupload/main(\?.*)?$", "preupload", self.preupload),
                    ("POST", REPO + r"/commit/main(\?.*)?$", "commit", self.commit),
                    ("POST", REPO + r"/tag/(?P<rev>[^/?]+)$", "tag", self.tag),
                ]
                for verb, pattern, name, handler in routes:
                    match = re.match(pattern, self.path)
                    if verb == method and match:
                        if name in hub.fail_next:
                            return self._reply(hub.fail_next.pop(name), {"error": "stand-in transient failure"})
                        return handler(match, raw)
                return self._reply(404, {"error": f"stand-in does not implement {method} {self.path}"})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def create(self, match, raw):
                body = json.loads(raw)
                repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                # huggingface_hub 1.x+ sends `visibility`; older clients sent `private`.
                private = body.get("visibility") == "private" or body.get("private") is True
                hub._repo(repo_id)["private"] = private
                self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def validate_yaml(self, match, raw):
                # The Hub checks a model card's metadata before a commit; so does the stand-in.
                content = json.loads(raw)["content"]
                try:
                    meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                except yaml.YAMLError as exc:
                    return self._reply(400, {"error": f"invalid YAML metadata: {exc}"})
                hub.validated.append(meta)
                self._reply(200, {"errors": [], "warnings": []})

            def refs(self, match, raw):
                repo = hub._repo(match["repo"])
                head = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
                self._reply(200, {
                    "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                    "converts": [], "pullRequests": [],
                    "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid}
                             for t, oid in repo["tags"].items()]})

            def preupload(self, match, raw):
                files = json.loads(raw)["files"]
                self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                             "oid": None} for f in files]})

            def commit(self, match, raw):
                repo = hub._repo(match["repo"])
                lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                         for item in lines if item["key"] == "file"}
                oid = hashlib.sha1(raw).hexdigest()
                repo["files"].update(files)
                repo["commits"].append({"oid": oid, "summary": header["summary"],
                                        "description": header.get("description", ""), "files": sorted(files)})
                self._reply(200, {"commitUrl": f"{hub.url}/{match['repo']}/commit/{oid}", "commitOid": oid,
                                  "pullRequestUrl": None})

            def tag(self, match, raw):
                body = json.loads(raw)
                repo = hub._repo(match["repo"])
                repo["tags"][body["tag"]] = match["rev"]
                self._reply(200, {})

        return Handler
