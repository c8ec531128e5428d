"""The labelling page of ``jaxrlhf collect``: a local web server (standard library only).

It binds to 127.0.0.1 (nothing is reachable from another machine, no data leaves it) and serves
one page that shows a prompt and two responses side by side. The person picks with a click or a
key — ``1`` left, ``2`` right, ``0`` tie, ``s`` skip, ``u`` undo — and sees how many pairs are
labelled of how many. Every label goes straight to the :class:`~jaxrlhf.collect.store.LabelStore`
(one fsynced line), so reloading or closing the tab loses nothing.

    GET  /            the page
    GET  /api/state   {"pair": {"pair_id", "prompt", "a", "b"} | null, "counts", "can_undo", "done"}
    POST /api/label   {"pair_id": int, "choice": "left" | "right" | "tie" | "skip"} → state
    POST /api/undo    {} → state (+ "undone": the pair_id whose label was removed)

The API answers only JSON POSTs whose Host is this server's address: a page of another site open
in the same browser cannot label (its cross-origin JSON request needs a CORS preflight that is
never granted, and a DNS-rebinding host name is refused). When the last pair is labelled the server
stops itself.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxrlhf.collect.page import PAGE
from jaxrlhf.collect.store import CHOICES, LabelStore

HOST = "127.0.0.1"


def display_text(value) -> str:
    """A prompt or response as the page shows it: text as is; a chat as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def state(store: LabelStore, **extra) -> dict:
    """What the page shows: the next pending pair, the counts, whether undo is possible."""
    with store.lock:
        pair = store.next_pair()
        counts = store.counts()
        out = {
            "pair": None
            if pair is None
            else {
                "pair_id": pair["pair_id"],
                "prompt": display_text(pair["prompt"]),
                "a": display_text(pair["a"]),
                "b": display_text(pair["b"]),
            },
            "counts": counts,
            "can_undo": bool(store.history),
            "done": pair is None,
        }
    out.update(extra)
    return out


class LabelServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1 around one LabelStore; ``url`` is where the page is."""

    daemon_threads = True

    def __init__(self, store: LabelStore, *, port: int = 0, labeler: str = "human", quiet=True):
        super().__init__((HOST, port), _Handler)
        self.store = store
        self.labeler = labeler
        self.quiet = quiet
        self.finished = threading.Event()  # every pair labelled
        self.page = PAGE.encode("utf-8")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def finish_soon(self) -> None:
        """Stop ``serve_forever`` from another thread (after the current answer is sent)."""
        self.finished.set()
        threading.Thread(target=self.shutdown, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}")

    def do_GET(self):
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        if self.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        if self.path == "/api/state":
            return self._json(HTTPStatus.OK, state(self.server.store))
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self):
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, json.JSONDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
        store = self.server.store
        if self.path == "/api/undo":
            undone = store.undo()
            return self._json(HTTPStatus.OK, state(store, undone=undone))
        if self.path != "/api/label":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
        pair_id, choice = body.get("pair_id"), body.get("choice")
        if choice not in CHOICES or not isinstance(pair_id, int):
            return self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"expected pair_id (int) and choice in {list(CHOICES)}"},
            )
        with store.lock:
            if pair_id not in store.by_id or pair_id in store.done:  # a double click, a stale tab
                return self._json(
                    HTTPStatus.CONFLICT, state(store, error=f"pair {pair_id} is not pending")
                )
            store.label(pair_id, choice, labeler=self.server.labeler)
            answer = state(store)
        self._json(HTTPStatus.OK, answer)
        if answer["done"]:
            self.server.finish_soon()
