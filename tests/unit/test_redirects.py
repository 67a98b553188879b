"""Redirects: the client follows one within the origin it asked, and refuses one to another host
(or port) with a clear error, so the `session` header (the API key) never reaches that host.
Two tiny servers on two loopback addresses: one redirects, one records the headers it gets."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from connector.config import TaniumSection
from connector.tanium import TR_PATH, TaniumClient, TaniumResponseError

KEY = "token-REDIRECT-7c1e"
SAME = "/same-origin"


class Server(ThreadingHTTPServer):
    """On `host`: under TR_PATH, redirects to `target` + SAME + path (default: its own origin);
    under SAME, answers an empty alert page. `seen` records (path, session header)."""

    daemon_threads = True

    def __init__(self, host: str, target: str | None = None):
        seen = self.seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append((self.path, self.headers.get("session")))
                if self.path.startswith(SAME):
                    body = orjson.dumps({"data": [], "meta": {"totalCount": 0}})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = b""
                    self.send_response(302)
                    self.send_header("Location", (outer.target or "") + SAME + self.path)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__((host, 0), Handler)
        self.target = target
        self.url = f"http://{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def other_host():
    s = Server("127.0.0.2")
    yield s
    s.close()


def client_for(server: Server) -> TaniumClient:
    host, port = server.server_address
    return TaniumClient(TaniumSection(protocol="http", host=host, port=port, api_key=KEY, max_retries=0))


def test_a_redirect_within_the_origin_is_followed(other_host):
    c = client_for(other_host)
    assert c.list_alerts([], 0, 1).items == []
    assert [p.split("?")[0] for p, _ in other_host.seen] == [f"{TR_PATH}/alerts", f"{SAME}{TR_PATH}/alerts"]
    c.close()


def test_a_redirect_to_another_host_is_refused_and_the_key_stays_home(other_host):
    redirector = Server("127.0.0.1", target=other_host.url)
    c = client_for(redirector)
    try:
        with pytest.raises(TaniumResponseError) as e:
            c.list_alerts([], 0, 1)
    finally:
        c.close()
        redirector.close()
    assert other_host.seen == [], "the other host got a request (with the API key)"
    assert redirector.seen and redirector.seen[0][1] == KEY
    msg = e.value.message
    assert other_host.url.removeprefix("http://") in msg and "redirect" in msg and "tanium.host" in msg
    assert KEY not in msg and not e.value.retryable
