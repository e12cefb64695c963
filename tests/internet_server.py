"""web.test of the test internet: HTTP on :80, HTTPS on :443 (run inside its netns).

    python internet_server.py ADDRESS CERT KEY

GET /hello      -> "hello from the test internet path=/hello client=IP\n"
GET /bytes/N    -> N bytes of 'x', streamed in 64 KiB writes (the benchmark's download)
anything else   -> the same as /hello, with its path
"""

from __future__ import annotations

import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = b"x" * 65536


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            while n > 0:
                piece = CHUNK[: min(n, len(CHUNK))]
                self.wfile.write(piece)
                n -= len(piece)
            return
        body = f"hello from the test internet path={self.path} client={self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    addr, cert, key = sys.argv[1:4]
    plain = ThreadingHTTPServer((addr, 80), Handler)
    tls = ThreadingHTTPServer((addr, 443), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    plain.serve_forever()


if __name__ == "__main__":
    main()
