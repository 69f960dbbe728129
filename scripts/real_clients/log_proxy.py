"""A logging reverse proxy for scripts/real_clients.sh --debug (standard library only).

    python3 log_proxy.py LISTEN_PORT UPSTREAM_URL LOG_FILE

Forwards every request to UPSTREAM_URL unchanged and streams the answer back
(server-sent events included), writing one JSON line per request to LOG_FILE:
method, path, the headers a server would care about (the API key redacted),
the JSON body, the response status and, for an error, the response body.

With OMNIRAY_PROXY_STRIP=a.b,c (dotted JSON paths), those request fields are
removed before forwarding (the log keeps what the client sent): a diagnosis aid
to see what a client trips on next once the server accepts a field.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEEP_HEADERS = ("content-type", "accept", "user-agent", "authorization", "x-api-key", "openai-organization")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "content-length", "host"}

_lock = threading.Lock()


def _write(log, record: dict) -> None:
    with _lock:
        log.write(json.dumps(record) + "\n")


def _strip(body: bytes, paths: list[list[str]]) -> bytes:
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    hit = False
    for path in paths:
        node = obj
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            del node[path[-1]]
            hit = True
    return json.dumps(obj).encode() if hit else body


def main() -> None:
    port, upstream, log_path = int(sys.argv[1]), urllib.parse.urlsplit(sys.argv[2]), sys.argv[3]
    log = open(log_path, "a", buffering=1)  # noqa: SIM115
    strip = [p.split(".") for p in os.environ.get("OMNIRAY_PROXY_STRIP", "").split(",") if p]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the JSON log is the record
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            sent = _strip(body, strip) if strip else body
            if sent is not body:
                headers["Content-Length"] = str(len(sent))
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=600)
            try:
                conn.request(self.command, self.path, body=sent or None, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                self.send_error(502, f"upstream: {e!r}")
                return
            record = {"method": self.command, "path": self.path,
                      "headers": {k.lower(): ("Bearer <redacted>" if k.lower() == "authorization" else v)
                                  for k, v in self.headers.items() if k.lower() in KEEP_HEADERS}}
            try:
                record["body"] = json.loads(body) if body else None
            except ValueError:
                record["body"] = body.decode("utf-8", "replace")[:2000]
            record["status"] = resp.status
            if resp.status >= 400:  # clients often drop the connection on an error without reading on
                data = resp.read()
                record["response_head"] = data.decode("utf-8", "replace")[:4000]
                _write(log, record)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                return
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            captured = bytearray()
            try:
                while chunk := resp.read1(65536):
                    if len(captured) < 4000:
                        captured += chunk[: 4000 - len(captured)]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError as e:
                record["client_gone"] = repr(e)
            finally:
                conn.close()
                record["response_head"] = captured.decode("utf-8", "replace")[:1500]
                _write(log, record)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _forward

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a client that hung up is not news
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
