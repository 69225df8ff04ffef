"""The socket floor for a remote step: a raw TCP server that reads ``up`` bytes and writes ``down`` bytes back,
per exchange, with a tiny length header. Run as its own process, like the optserve server."""

from __future__ import annotations

import socket
import struct
import sys


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            buf = bytearray()
            while True:
                head = conn.recv(16, socket.MSG_WAITALL)
                if len(head) < 16:
                    break
                up, down = struct.unpack("<QQ", head)
                if len(buf) < max(up, down):
                    buf = bytearray(max(up, down))
                view = memoryview(buf)
                got = 0
                while got < up:
                    n = conn.recv_into(view[got:up])
                    if n == 0:
                        break
                    got += n
                conn.sendall(view[:down])


if __name__ == "__main__":
    serve(int(sys.argv[1]))
