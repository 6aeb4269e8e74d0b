"""How many requests this worker has accepted and not yet answered, by the server's own accounting.

Written here because uvicorn's graceful shutdown drops two kinds of request a client has already sent: it closes
every connection whose request it has not started to parse (the bytes wait unread in the socket), and closing the
listening socket resets the connections still waiting in the kernel's accept queue. With both cores busy the event
loop falls behind and both happen (clients saw ReadError / RemoteProtocolError). On SIGTERM the service waits until
this count is 0, then hands the signal to uvicorn:

- requests uvicorn is handling: its own task set (``ServerState.tasks``: from the headers to the last byte sent);
- requests sent but not yet read: unread bytes on this process's TCP connections;
- connections not yet accepted: the accept queue of this process's listening sockets.

The last two come from Linux's ``/proc/net/tcp`` (elsewhere they count as 0 and only the first remains).
"""

from __future__ import annotations

import os
from pathlib import Path

import uvicorn.server

LISTEN, ESTABLISHED = "0A", "01"  # socket states in /proc/net/tcp
_server_states: list[uvicorn.server.ServerState] = []


class _RecordedServerState(uvicorn.server.ServerState):
    """uvicorn's shared server state, remembered so that the service can read its task set."""

    def __init__(self) -> None:
        super().__init__()
        _server_states.append(self)


def install() -> None:
    """Record the state of the uvicorn server this worker is about to create (BentoML creates it after it loads
    the service module)."""
    uvicorn.server.ServerState = _RecordedServerState


def unanswered() -> int:
    """Requests accepted (by the kernel or by uvicorn) and not yet answered, in this worker."""
    handling = sum(len(state.tasks) for state in _server_states)
    return handling + sum(queued for _, queued in _own_sockets())


def _own_sockets() -> list[tuple[str, int]]:
    """(state, bytes or connections waiting) of this process's TCP sockets: unread bytes of an established
    connection, the accept queue of a listening socket."""
    inodes = set()
    fd_dir = Path(f"/proc/{os.getpid()}/fd")
    try:
        for fd in fd_dir.iterdir():
            with_target = os.readlink(fd) if fd.is_symlink() else ""
            if with_target.startswith("socket:["):
                inodes.add(with_target[len("socket:[") : -1])
    except OSError:  # not Linux, or a descriptor closed while we looked
        return []
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            state, queues, inode = fields[3], fields[4], fields[9]
            if inode in inodes and state in (LISTEN, ESTABLISHED):
                found.append((state, int(queues.split(":")[1], 16)))
    return found
