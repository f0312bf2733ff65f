"""What coturn's turnutils_uclient reports at the end of a run, read from its output."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class UclientResult:
    args: list[str]
    output: str

    @property
    def sent_bytes(self) -> int:
        return int(re.findall(r"tot_send_bytes ~ (\d+)", self.output)[-1])

    @property
    def recv_bytes(self) -> int:
        return int(re.findall(r"tot_recv_bytes ~ (\d+)", self.output)[-1])

    @property
    def lost_packets(self) -> int:
        return int(re.findall(r"Total lost packets (\d+)", self.output)[-1])
