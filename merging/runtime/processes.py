"""Which process owns a run or a temporary directory, and whether it is still alive.

A crash (kill -9) leaves `running` rows and temporary directories behind; the next command can clean them only if
it can tell a dead owner from a live one. Owners are named `<host tag>-<pid>`: on this host a pid is checked
directly, on another host only a stale heartbeat (or age) says it is gone.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from functools import lru_cache

_TOKEN = re.compile(r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)")


def hostname() -> str:
    return socket.gethostname()


@lru_cache(maxsize=None)
def host_tag(host: str | None = None) -> str:
    """Six hex digits naming a host (fits in a file name whatever the host name holds)."""
    return hashlib.sha256((host or hostname()).encode()).hexdigest()[:6]


def owner_token() -> str:
    return f"{host_tag()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie, killed but not yet waited for, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): the signal said it exists


def owner_alive(host: str | None, pid: int | None) -> bool | None:
    """True or False on this host; None where it cannot be told (another host, or no owner recorded)."""
    if host is None or pid is None:
        return None
    if host != hostname() and host != host_tag():
        return None
    return pid_alive(pid)


def token_owner(name: str) -> tuple[str, int] | None:
    """The (host tag, pid) an owner token inside `name` names, if it has one."""
    match = _TOKEN.search(name)
    return (match.group("host"), int(match.group("pid"))) if match else None


def orphaned_processes(marker: str, env_key: str, env_value: str) -> list[int]:
    """Processes on this host whose command line holds `marker`, whose environment sets `env_key` to `env_value`
    and whose parent is gone (re-parented to init): a helper server a killed job started and nobody will stop."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[-1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == 1 and environ.get(env_key.encode()) == env_value.encode():
            found.append(int(entry))
    return found
