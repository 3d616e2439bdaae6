"""A small HTTPS server for tests (MTA-STS policies), on 127.0.0.x.

    with HTTPSServer("127.0.0.5", ssl_context, port=443) as web:
        web.pages["/.well-known/mta-sts.txt"] = (200, "text/plain", b"version: STSv1\\n...")
        ...
        web.requests      # [(host header, path), ...]

A page given as bytes is sent as the whole answer, status line and header
included. A path not in ``pages`` gets 404. ``port=0`` picks a free port.
"""

import http.server
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        web = self.server.web
        with web._lock:
            web.requests.append((self.headers.get("Host", ""), self.path))
        page = web.pages.get(self.path, (404, "text/plain", b"not found\n"))
        if isinstance(page, bytes):          # a whole answer, as it is
            self.wfile.write(page)
            self.close_connection = True
            return
        status, ctype, body = page
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if 300 <= status < 400:
            self.send_header("Location", "https://elsewhere.test/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HTTPSServer:
    def __init__(self, host, ssl_context, port=0):
        self.pages = {}
        self.requests = []
        self._lock = threading.Lock()
        self.server = _Server((host, port), _Handler)
        self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.server.web = self
        self.host, self.port = host, self.server.server_address[1]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
