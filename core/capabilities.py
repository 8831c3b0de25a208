"""What the connected Redis can do, from its version, detected once at start."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis


@dataclass(frozen=True)
class Capabilities:
    """The version-dependent paths this server offers; `status` shows which are in use."""

    version: tuple[int, int, int]

    @property
    def acked_trim(self) -> bool:
        """XTRIM ... ACKED (Redis 8.2): the server itself keeps entries some group has not acked."""
        return self.version >= (8, 2, 0)

    @property
    def readgroup_claim(self) -> bool:
        """XREADGROUP ... CLAIM (Redis 8.4): reclaim and read in one call."""
        return self.version >= (8, 4, 0)

    @property
    def xadd_idmp(self) -> bool:
        """XADD ... IDMP (Redis 8.6): the server drops a repeated publish of one order."""
        return self.version >= (8, 6, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """'7.0.15' -> (7, 0, 15); missing or odd parts count as 0."""
    numbers = [int(part) if part.isdigit() else 0 for part in text.split(".")[:3]] + [0, 0, 0]
    return numbers[0], numbers[1], numbers[2]


async def detect(redis: Redis) -> Capabilities:
    info = await redis.info("server")
    return Capabilities(parse_version(str(info.get("redis_version", "0"))))
