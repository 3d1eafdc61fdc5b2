"""A STAND-IN for a Kubernetes API server with KServe installed: only the calls `medtune.kserve` makes.

No cluster exists where the tests run. This local HTTP server stores what the official `kubernetes` client
creates and replaces (ServiceAccount, its token Secret, Role, RoleBinding, ServingRuntime, InferenceService), bumps
`metadata.generation` on a spec change as the API server does, and plays the KServe controller: an
InferenceService becomes Ready (status.observedGeneration, a Ready condition, address.url) after a few
polls, unless its model version is listed in `broken` (it then reports the crash a real predictor would).
`/models/<isvc>/v1/chat/completions` plays the vLLM predictor, answering as the served LoRA module the
current spec names. It records every request.
"""

from __future__ import annotations

import copy
import json
import re
from http.server import BaseHTTPRequestHandler

from standin import LoopbackServer

CORE = r"/api/v1/namespaces/(?P<ns>[^/]+)/(?P<plural>serviceaccounts|secrets)"
RBAC = r"/apis/rbac\.authorization\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<plural>roles|rolebindings)"
CUSTOM = r"/apis/serving\.kserve\.io/(?P<version>v1alpha1|v1beta1)/namespaces/(?P<ns>[^/]+)/" \
         r"(?P<plural>servingruntimes|inferenceservices)"


class KubeStandIn(LoopbackServer):
    def __init__(self, polls_to_ready: int = 2, broken: tuple[str, ...] = (), smoke_status: int = 200):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.requests: list[tuple[str, str, dict | None]] = []
        self.polls_to_ready, self.broken, self.smoke_status = polls_to_ready, set(broken), smoke_status
        self.polls: dict[tuple, int] = {}
        self._serve(self._handler())
        self._resource_version = 0

    def isvc(self, ns: str, name: str) -> dict | None:
        return self.objects.get(("inferenceservices", ns, name))

    # ---- what the API server and the KServe controller do -------------------------------------------------

    def _store(self, plural: str, ns: str, obj: dict, existing: dict | None) -> dict:
        obj = copy.deepcopy(obj)
        self._resource_version += 1
        meta = obj["metadata"]
        meta["namespace"] = ns
        meta["resourceVersion"] = str(self._resource_version)
        changed = existing is None or existing.get("spec") != obj.get("spec")
        meta["generation"] = (existing or {}).get("metadata", {}).get("generation", 0) + (1 if changed else 0)
        obj["status"] = (existing or {}).get("status", {})
        self.objects[(plural, ns, meta["name"])] = obj
        self.polls[(plural, ns, meta["name"])] = 0
        return obj

    def _observe(self, plural: str, ns: str, name: str) -> dict:
        obj = self.objects[(plural, ns, name)]
        if plural != "inferenceservices":
            return obj
        key = (plural, ns, name)
        self.polls[key] += 1
        version = obj["metadata"]["labels"].get("medtune/model-version")
        if self.polls[key] >= self.polls_to_ready:
            ready = version not in self.broken
            obj["status"] = {"observedGeneration": obj["metadata"]["generation"],
                             "address": {"url": f"{self.url}/models/{name}"},
                             "conditions": [{"type": "Ready", "status": str(ready),
                                             "reason": "" if ready else "PredictorCrashLoopBackOff",
                                             "message": "" if ready else "kserve-container: CUDA out of memory"}]}
        return obj

    def _served_model(self, ns: str, name: str) -> str:
        args = self.objects[("inferenceservices", ns, name)]["spec"]["predictor"]["model"]["args"]
        return args[args.index("--lora-modules") + 1].split("=")[0]

    def _handler(self):
        kube = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str):
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                   "message": f"{message} (kubernetes stand-in)", "code": code})

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _route(self, method: str):
                body = self._body()
                kube.requests.append((method, self.path, body))
                path = self.path.split("?")[0]
                model = re.fullmatch(r"/models/(?P<name>[^/]+)/v1/chat/completions", path)
                if model and method == "POST":
                    return self.smoke(model["name"], body)
                for pattern in (CORE, RBAC, CUSTOM):
                    match = re.fullmatch(pattern + r"(/(?P<name>[^/]+))?", path)
                    if match:
                        return self.objects(method, match["plural"], match["ns"], match["name"], body)
                self._status(404, "NotFound", f"the stand-in does not implement {method} {path}")

            def objects(self, method, plural, ns, name, body):
                key = (plural, ns, name or (body or {}).get("metadata", {}).get("name"))
                existing = kube.objects.get(key)
                if method == "GET":
                    if existing is None:
                        return self._status(404, "NotFound", f"{plural} \"{key[2]}\" not found")
                    return self._reply(200, kube._observe(*key))
                if method == "POST":
                    if existing is not None:
                        return self._status(409, "AlreadyExists", f"{plural} \"{key[2]}\" already exists")
                    return self._reply(201, kube._store(plural, ns, body, None))
                if method == "PUT":
                    if existing is None:
                        return self._status(404, "NotFound", f"{plural} \"{key[2]}\" not found")
                    if body["metadata"].get("resourceVersion") != existing["metadata"]["resourceVersion"]:
                        return self._status(409, "Conflict", "the object has been modified")
                    return self._reply(200, kube._store(plural, ns, body, existing))
                self._status(405, "MethodNotAllowed", method)

            def smoke(self, name, body):
                served = kube._served_model(kube.server_namespace(name), name)
                if kube.smoke_status != 200:
                    return self._reply(kube.smoke_status, {"error": {"message": "stand-in predictor failure"}})
                self._reply(200, {"object": "chat.completion", "model": served, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"stand-in answer to: "
                                             f"{body['messages'][-1]['content']}"}, "finish_reason": "stop"}]})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

        return Handler

    def server_namespace(self, name: str) -> str:
        return next(ns for (plural, ns, n) in self.objects if plural == "inferenceservices" and n == name)
