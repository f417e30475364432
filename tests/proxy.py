"""A TCP proxy in front of an etcd that a test can pause: a network partition between the agents and etcd while the
test itself still reads etcd directly, so that what etcd holds at a given moment (a lease's time to live, a key) is
etcd's own answer, not one read after a thaw that the agents race.

Paused, it accepts connections and reads what arrives but forwards nothing either way until resumed (bytes held,
not dropped: a partition that heals, as TCP retransmission makes it). One thread per direction per connection.
"""

from __future__ import annotations

import socket
import threading


class PauseProxy:
    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.flowing = threading.Event()
        self.flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "PauseProxy":
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()  # paused: held here, then forwarded in order
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side ended: end the other, so that the client sees the connection go
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        self.flowing.set()
        self._listener.close()
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
