"""A shutdown that drops no request a client has sent: drain by the server's own accounting, then stop.

Written here because uvicorn's graceful shutdown under BentoML drops two kinds of request. It closes every
connection whose request it has not started to parse (the bytes wait unread in the socket: the client sees
RemoteProtocolError). And BentoML's arbiter keeps its copy of the listening socket open until every worker has
exited, so a client that connects after the workers stopped accepting is taken into the kernel's accept queue and
reset when the arbiter exits (ReadError). Both showed with both cores busy. So on SIGTERM a worker:

1. takes in what waits in the accept queue (its accept loop keeps running until the queue is empty);
2. shuts the listening socket down for every process that shares it, so that later clients are refused at once
   (ConnectError: never accepted, never dropped), and closes its own listener;
3. answers every request it has accepted: uvicorn's own task set (from the headers to the last byte sent) and
   the bytes still unread on its connections;
4. hands the signal to uvicorn, whose shutdown then finds only idle connections.

The queue and unread bytes come from Linux's ``/proc/net/tcp``; elsewhere they count as 0 (steps 1 and 3 then
rest on uvicorn's task set alone).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn
import uvicorn.server

LISTEN, ESTABLISHED = "0A", "01"  # socket states in /proc/net/tcp
POLL_S = 0.02
_servers: list[uvicorn.Server] = []


class _RecordedServer(uvicorn.Server):
    """uvicorn's server, remembered with its event loop so that the service can drain it."""

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        _servers.append(self)


def install() -> None:
    """Record the uvicorn server this worker is about to create (BentoML creates it after loading the service)."""
    uvicorn.Server = uvicorn.server.Server = _RecordedServer


def drain(deadline_s: float) -> None:
    """Steps 1-3 above, for at most ``deadline_s`` in all; call it from a thread other than the event loop's."""
    deadline = time.monotonic() + deadline_s
    _wait(lambda: _queued(LISTEN) == 0, deadline)
    for server in list(_servers):
        stopped = threading.Event()
        server.loop.call_soon_threadsafe(_stop_listening, server, stopped)
        stopped.wait(max(0.0, deadline - time.monotonic()))
    _wait(lambda: unanswered() == 0, deadline)


def unanswered() -> int:
    """Requests accepted and not yet answered in this worker: those uvicorn is handling, and connections with
    bytes not yet read."""
    return sum(len(server.server_state.tasks) for server in _servers) + _queued(ESTABLISHED)


def _stop_listening(server: uvicorn.Server, stopped: threading.Event) -> None:
    try:
        for listener in server.servers:
            for sock in listener.sockets:
                shared = socket.socket(fileno=os.dup(sock.fileno()))
                try:
                    shared.shutdown(socket.SHUT_RD)  # the socket itself, in every process that holds it
                except OSError:  # another worker shut it down first
                    pass
                finally:
                    shared.close()
            listener.close()
    finally:
        stopped.set()


def _wait(done, deadline: float) -> None:
    while not done() and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _queued(state: str) -> int:
    """Connections waiting in the accept queues of this process's listening sockets (``LISTEN``), or bytes
    waiting unread on its established connections (``ESTABLISHED``)."""
    inodes = _socket_inodes()
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and fields[9] in inodes:
                total += int(fields[4].split(":")[1], 16)
    return total


def _socket_inodes() -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{os.getpid()}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed while we looked
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:  # not Linux
        pass
    return inodes
