"""A small Hugging Face Hub on 127.0.0.1: the endpoints `huggingface_hub.hf_hub_download` calls for a file at a
revision (HEAD then GET of /ORG/NAME/resolve/REVISION/FILE, with Range for a resumed download), and the hub's
error headers for a missing repository, revision or file and for a gated repository.

Point `HF_ENDPOINT` at `FakeHub.url` (in a subprocess's environment, or `huggingface_hub.constants.ENDPOINT` in
this one). `cut_after` makes the next GET of a file send that many bytes and drop the connection, once per call;
`requests` records every (method, path, Range) for the tests to check what was fetched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import pathlib
import threading

import huggingface_hub.constants


@dataclasses.dataclass
class Repo:
    """Files per commit, and the branches and tags that point at commits."""

    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


def repo_from_folder(folder: pathlib.Path, commit: str = "a" * 40, refs: dict[str, str] | None = None) -> Repo:
    """A one-commit repository holding every file of `folder` (e.g. a `save_pretrained` output), on `main`."""
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    return Repo(commits={commit: files}, refs={"main": commit, **(refs or {})})


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: dict[str, int] = {}  # file name -> bytes sent before the connection drops (next GET only)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the tests read `requests`
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        parts = handler.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return _error(handler, 404, "RepoNotFound", "Repository not found")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(handler, 401, "RepoNotFound", "Invalid username or password.")
        if repo.gated and "authorization" not in {k.lower() for k in handler.headers}:
            return _error(handler, 401, "GatedRepo", "Access to model is restricted.")
        commit = repo.commit_of(revision)
        if commit is None:
            return _error(handler, 404, "RevisionNotFound", "Invalid rev id: " + revision)
        content = repo.commits[commit].get(filename)
        if content is None:
            return _error(handler, 404, "EntryNotFound", "Entry not found")
        start = int(handler.headers["Range"].split("=")[1].split("-")[0]) if handler.headers.get("Range") else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if not body:
            return
        cut = self.cut_after.pop(filename, None)
        if cut is not None:
            handler.wfile.write(content[start:start + cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # the body ends short of Content-Length: a cut download
            return
        handler.wfile.write(content[start:])


def _error(handler: http.server.BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    handler.send_response(status)
    handler.send_header("X-Error-Code", code)
    handler.send_header("X-Error-Message", message)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def use_hub(monkeypatch, url: str, cache: pathlib.Path, offline: bool = False) -> None:
    """This process and its subprocesses talk to `url` and keep downloads in `cache` (read by the hub at import)."""
    environment = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
