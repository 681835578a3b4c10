"""The embedded broker: kombu's filesystem transport with atomic writes and atomic claims.

kombu's own transport lets a consumer move and read a message file while its producer is
still writing it, so under load a message can be read empty and lost (seen here with
several producers). Here a producer writes under a temporary name and renames the file into
place, and a consumer claims a message by renaming it into its processed folder on the same
filesystem: exactly one consumer wins, and it always reads a whole message.
"""

from __future__ import annotations

import os
import time
import uuid
from queue import Empty
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        tmp = os.path.join(self.data_folder_out, f"_{uuid.uuid4()}.tmp")  # never matches a queue's pattern
        with open(tmp, "wb") as f:
            f.write(dumps(payload).encode())
        os.rename(tmp, os.path.join(self.data_folder_out, name))

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            with open(claimed, "rb") as f:
                payload = f.read()
            os.remove(claimed)
            return loads(payload.decode())
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
