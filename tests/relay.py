"""A TCP relay on localhost whose connections can go silent or be reset: a network fault for tests."""

import json
import os
import socket
import threading


class Relay:
    """Forwards TCP connections to `port`; each can go silent (bytes dropped, no reset) or be reset."""

    def __init__(self, port: int):
        self._port = port
        self._listener = socket.create_server(("localhost", 0))
        self.address = f"localhost:{self._listener.getsockname()[1]}"
        self.target = f"grpc://{self.address}"
        self._lock = threading.Lock()
        self._links = []  # (client side, task side, {"silent": bool})
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def silence(self, index: int) -> None:
        """Connection `index` drops every byte from now on: it looks open and never answers."""
        with self._lock:
            self._links[index][2]["silent"] = True

    def silence_all(self) -> None:
        """Every connection open now goes silent; later ones forward as before."""
        with self._lock:
            for _, _, state in self._links:
                state["silent"] = True

    def reset_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for near, far, _ in links:
            for s in (near, far):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()

    def _accept(self):
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("localhost", self._port))
            except OSError:  # the task is not up yet (or gone): the client sees a closed connection
                near.close()
                continue
            state = {"silent": False}
            with self._lock:
                self._links.append((near, far, state))
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b, state), daemon=True).start()

    @staticmethod
    def _pump(a, b, state):
        while True:
            try:
                data = a.recv(65536)
                if not data:
                    return
                if not state["silent"]:
                    b.sendall(data)
            except OSError:
                return


def relay_ps0_in_tf_config() -> Relay:
    """Points this process's TF_CONFIG at a new relay to ps 0 (before a strategy reads it); returns the relay."""
    config = json.loads(os.environ["TF_CONFIG"])
    relay = Relay(int(config["cluster"]["ps"][0].rsplit(":", 1)[1]))
    config["cluster"]["ps"][0] = relay.address
    os.environ["TF_CONFIG"] = json.dumps(config)
    return relay
