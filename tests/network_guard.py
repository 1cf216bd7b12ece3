"""The network guard: every connection and name lookup that would leave the machine fails and is logged.

    undo = block_network(log_path)            # in this process
    env = guarded_env(tmp_path, log_path)     # for a `leader` subprocess: installed by a sitecustomize.py

Loopback stays open (it never leaves the host). tests/faults/test_safety.py proves the guard, and
the demo's smoke run (tests/test_demo.py) runs under it.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from tests.faults.conftest import cli_env


def block_network(log_path: str):
    """Make connections and lookups for non-loopback hosts fail, logging each; returns an undo function.

    Only the standard library: this function's source is also the sitecustomize of subprocesses.
    """
    import errno
    import ipaddress
    import socket

    def is_loopback(host) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return host == "localhost"

    def refuse(what: str):
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(what + "\n")
        raise OSError(errno.ENETUNREACH, f"network access blocked by the fault suite: {what}")

    originals = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
                 "getaddrinfo": socket.getaddrinfo}

    def guarded(method: str):
        def call(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
                refuse(f"{method} {address!r}")
            return originals[method](self, address)
        return call

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_loopback(host):
            refuse(f"getaddrinfo {host!r}")
        return originals["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded("connect"), guarded("connect_ex")
    socket.getaddrinfo = getaddrinfo

    def undo() -> None:
        socket.socket.connect, socket.socket.connect_ex = originals["connect"], originals["connect_ex"]
        socket.getaddrinfo = originals["getaddrinfo"]

    return undo


def guarded_env(tmp_path: Path, log: Path) -> dict[str, str]:
    """The environment of a `leader` subprocess with the guard installed at interpreter start."""
    site = tmp_path / "network_guard"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        inspect.getsource(block_network) + f"\n\nblock_network({str(log)!r})\n", encoding="utf-8")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env
