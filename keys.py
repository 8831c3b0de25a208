"""Every Redis key the pipeline uses, derived in one place from the stream key.

Keys that change together in one atomic step (the stream, the guard's keys, the consumers'
leases) share the stream's hash tag, so on Redis Cluster each step stays in one slot. A key
without braces hashes whole, so `{orders}:...` lands in the slot of `orders` itself: with one
stream, the stream key stays exactly as configured and `redis-cli XADD orders ...` works.

| key | type | what |
| --- | --- | --- |
| `orders` | stream | the orders |
| `{orders}:lease:<group>:<consumer>` | string with a TTL | a running consumer's sign of life |
| `{orders}:done:<group>` | sorted set | order_id -> server time it was done, for DEDUPE_WINDOW_MS |
| `{orders}:running:<group>` | hash | order_id -> "consumer entry_id" while a consumer runs it |
| `{orders}:producer:<id>:ids` / `:recent` | hash / list | a producer's last order ids (Redis 7.x only) |
"""

from __future__ import annotations

from dataclasses import dataclass

from config import Settings


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes for `key`: the text inside its first `{...}`, else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start != -1 and end > start + 1:
        return key[start + 1 : end]
    return key


@dataclass(frozen=True)
class Keys:
    """The keys of one stream; every key but the dead-letter stream shares the stream's slot."""

    stream: str
    dead_letter: str

    @property
    def tag(self) -> str:
        return "{" + hash_tag(self.stream) + "}"

    def lease_prefix(self, group: str) -> str:
        return f"{self.tag}:lease:{group}:"

    def lease(self, group: str, consumer: str) -> str:
        return self.lease_prefix(group) + consumer

    def done(self, group: str) -> str:
        return f"{self.tag}:done:{group}"

    def running(self, group: str) -> str:
        return f"{self.tag}:running:{group}"

    def producer(self, producer_id: str) -> tuple[str, str]:
        """A producer's map of idempotency ids to entry ids, and its list of them, newest first."""
        return f"{self.tag}:producer:{producer_id}:ids", f"{self.tag}:producer:{producer_id}:recent"


def keys_for(settings: Settings) -> Keys:
    return Keys(stream=settings.stream_key, dead_letter=settings.dead_letter_stream)


def stream_keys(stream: str) -> Keys:
    """The keys of `stream` where only the stream is known (the producer's API takes a stream name)."""
    return Keys(stream=stream, dead_letter=f"{stream}:dead-letter")
