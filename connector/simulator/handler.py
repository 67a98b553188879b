"""The simulator's HTTP layer: a threading server whose handler passes every request to
`Simulator.handle` and can reply, reset or drop the connection as a fault demands."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import orjson

log = logging.getLogger(__name__)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, sim: Any):  # a Simulator: it calls sim.handle(request)
        self.sim = sim
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        # TLS handshakes run here, in the connection's own thread, not in the accept loop
        raw = request
        with self.sim._conns_lock:
            self.sim._conns.add(raw)
        try:
            if self.sim._ssl is not None:
                try:
                    request = self.sim._ssl.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    log.debug("simulator: TLS handshake failed: %s", e)
                    return
            super().finish_request(request, client_address)
        finally:
            with self.sim._conns_lock:
                self.sim._conns.discard(raw)

    def handle_error(self, request, client_address):
        log.debug("simulator: connection error from %s", client_address, exc_info=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Tanium"
    sys_version = ""
    timeout = 120  # idle keep-alive connections

    def do_GET(self):  # noqa: N802 (http.server API)
        try:
            cast(Server, self.server).sim.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a simulator bug: say so loudly, answer 500
            log.exception("simulator: error handling %s %s", self.command, self.path.split("?")[0])
            self.close_connection = True
            try:
                self.reply(500, {"text": "simulator error"})
            except OSError:
                pass

    do_PUT = do_GET  # noqa: N815 (http.server API): state changes, see lifecycle.py

    def do_POST(self):  # noqa: N802
        self.reply(405, {"text": "Method Not Allowed"})

    def reply(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self.send_body(status, orjson.dumps(payload), headers)

    def setup(self):
        super().setup()
        # small replies must not wait for the client's delayed ACK (Nagle): 40 ms per request otherwise
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_body(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # end_headers(), but headers and body leave in one write (http.server keeps no public hook for that)
        self._headers_buffer.append(b"\r\n")  # type: ignore[attr-defined]
        self._headers_buffer.append(body)  # type: ignore[attr-defined]
        self.flush_headers()

    def reset(self, status: int, body: bytes) -> None:
        """Headers and half the body, then a TCP reset."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.drop()

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def log_message(self, fmt, *args):  # one line per request is noise at benchmark rates
        pass
