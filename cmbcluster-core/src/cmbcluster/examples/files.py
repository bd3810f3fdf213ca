"""The embedded default's Files application: Python's file server for the working folder, listening
on a Unix socket that only its user can open (``python -m cmbcluster.examples.files SOCKET``).

``python -m http.server`` listens on a TCP port, which every user of the machine can reach; the
control plane's proxy reaches this one through the socket, for the environment's owner only.
"""

from __future__ import annotations

import http
import http.server
import os
import socketserver
import sys
from typing import Any


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Handler(http.server.SimpleHTTPRequestHandler):
    def address_string(self) -> str:
        return "proxy"  # a Unix socket's peer has no address

    def send_head(self) -> Any:
        try:
            return super().send_head()
        except ValueError:  # a NUL in the path (%00), which no file name holds: http.server lets it escape
            self.send_error(http.HTTPStatus.NOT_FOUND, "File not found")
            return None


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cmbcluster.examples.files SOCKET")
    previous = os.umask(0o177)  # the socket file: read and write for this user only
    try:
        server = _Server(sys.argv[1], _Handler)
    finally:
        os.umask(previous)
    print(f"serving {os.getcwd()} on {sys.argv[1]}", flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    main()
