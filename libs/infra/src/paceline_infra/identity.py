"""Who this process is: a server id that is unique across hosts and restarts."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from paceline_contracts.states import ServerKind


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    kind: ServerKind
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            # kind and pid make logs readable; the random part survives pid reuse.
            object.__setattr__(
                self, "id", f"{self.kind.value}-{self.host}-{self.pid}-{uuid.uuid4().hex[:6]}"
            )
