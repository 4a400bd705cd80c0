"""A loopback HTTP server for download tests: static files with ``Range`` support."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with support for ``Range: bytes=N-``; logs every request."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        requested = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not requested or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        start = int(requested.removeprefix("bytes=").split("-")[0])
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(data[start:])
        return None

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[tuple[str, list]]:
    """(base URL serving ``folder``, log of (path, Range) requests) while the block runs."""
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(RangeHandler, directory=folder)
    )
    httpd.requests = []
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
