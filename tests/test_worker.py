"""An attempt's glue between the store and the engine (bgtransfer._worker): who owns an attempt."""

from __future__ import annotations

import os
import socket
import threading

from bgtransfer._worker import attempt_owner


def test_an_attempts_owner_is_one_per_process_and_thread() -> None:
    """The owner that fences an attempt's writes (with its token) names the host and process, a
    random part per process (two hosts may share a name), and the thread beside the main one: the
    same in one thread, another in a second thread and in a forked child."""
    mine = attempt_owner()
    assert mine == attempt_owner()
    host, pid, nonce = mine.split(":")
    assert host == socket.gethostname() and int(pid) == os.getpid() and len(nonce) == 8
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append(attempt_owner()))
    thread.start()
    thread.join()
    assert other[0].startswith(mine + ":") and other[0] != mine
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(write, attempt_owner().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 200).decode().split(":")
    os.close(read)
    assert theirs[0] == host and theirs[1] == str(child) and theirs[2] != nonce
