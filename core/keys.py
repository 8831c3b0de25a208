"""Every Redis key the pipeline uses, derived in one place from the stream key and the partition.

Keys that change together in one atomic step (the stream, the guard's keys, the consumers'
leases) share the stream's hash tag, so on Redis Cluster each step stays in one slot. A key
without braces hashes whole, so `{orders}:...` lands in the slot of `orders` itself: with one
stream, the stream key stays exactly as configured and `redis-cli XADD orders ...` works.

| key | type | what |
| --- | --- | --- |
| `orders` | stream | the orders |
| `{orders}:lease:<group>:<consumer>` | string with a TTL | a running consumer's sign of life |
| `{orders}:state:<group>:<consumer>` | string with a TTL | its report: retries waiting, an outage (JSON) |
| `{orders}:done:<group>` | sorted set | order_id -> server time it was done, for DEDUPE_WINDOW_MS |
| `{orders}:running:<group>` | hash | order_id -> "consumer entry_id" while a consumer runs it |
| `{orders}:producer:<id>:calls` / `:recent` | hash / list | where a producer's last calls stand (`append`) |
| `{orders}:input:<digest>` | string with a TTL | how far an input was published (a checkpoint) |

Partitioned (REDIS_CLUSTER=true or STREAM_PARTITIONS=N > 1), partition `i` of `0..N-1` is the
stream `{orders:i}` (just `orders` when N is 1), and every key above takes that stream's tag:
`{orders:2}:done:email_group`, ... Its dead letters go to `{orders:i}:dead-letter` (`{orders}:dead-letter`
when N is 1), in its slot, since dead-lettering is one atomic step with the ack. An order goes
to partition `partition_of(order_id, N)`: CRC-32 of its UTF-8 `order_id`, modulo N.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

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

    def state(self, group: str, consumer: str) -> str:
        return f"{self.tag}:state:{group}:{consumer}"

    def done(self, group: str) -> str:
        return f"{self.tag}:done:{group}"

    def running(self, group: str) -> str:
        return f"{self.tag}:running:{group}"

    def producer(self, producer_id: str) -> tuple[str, str]:
        """A producer's hash of its last calls (call -> where it stands), its list of them (newest first)."""
        return f"{self.tag}:producer:{producer_id}:calls", f"{self.tag}:producer:{producer_id}:recent"

    def input(self, name: str) -> str:
        """An input's checkpoint: how far the producer published it."""
        return f"{self.tag}:input:{name}"


def keys_for(settings: Settings) -> Keys:
    return Keys(stream=settings.stream_key, dead_letter=settings.dead_letter_stream)


def stream_keys(stream: str) -> Keys:
    """The keys of `stream` where only the stream is known (the producer's API takes a stream name)."""
    return Keys(stream=stream, dead_letter=f"{stream}:dead-letter")


def partition_of(order_id: str, partitions: int) -> int:
    """The partition of an order: CRC-32 (IEEE: zlib, Java, Go) of its UTF-8 `order_id`, modulo N.

    `partition_of("ord-1", 3)` is 0: crc32(b"ord-1") = 576472767 and 576472767 % 3 = 0.
    """
    return zlib.crc32(order_id.encode("utf-8", "surrogatepass")) % partitions


def partition_stream(stream: str, index: int, partitions: int) -> str:
    """The stream key of partition `index`: `stream` itself when there is one, else `{stream:index}`."""
    return stream if partitions == 1 else "{" + f"{stream}:{index}" + "}"


def partitions(settings: Settings) -> list[Settings]:
    """The settings of each partition: its own STREAM_KEY and DEAD_LETTER_STREAM, in its slot.

    Unpartitioned (one Redis, STREAM_PARTITIONS=1), just `settings`. Every script runs its
    per-stream work once per partition.
    """
    if not settings.partitioned:
        return [settings]
    count = settings.stream_partitions
    streams = [partition_stream(settings.stream_key, i, count) for i in range(count)]
    return [
        replace(settings, stream_key=stream, dead_letter_stream="{" + hash_tag(stream) + "}:dead-letter")
        for stream in streams
    ]
