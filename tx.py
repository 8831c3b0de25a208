"""What a transactional handler stages: Redis writes applied with its order's commit, or never.

A handler that takes a second argument gets a `Tx`. The writes it stages are applied in the
same atomic step that acks the entry (the fenced commit in core/library.lua): if the consumer
dies first, or another consumer took the entry over, none of them is applied; if the
commit is sent twice (a lost reply), they are applied once. On Redis Cluster that step runs
in one hash slot, so every key written must share the stream's hash tag: `tx.key("stock")`
names one that does, and any other key is refused at the write that stages it.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.typing import EncodableT

from core.keys import hash_tag


class CrossSlotWrite(ValueError):
    """A staged write to a key outside the stream's hash slot."""


class Tx:
    """The Redis writes one handler run stages for its order."""

    __slots__ = ("commands", "stream")

    def __init__(self, stream: str) -> None:
        # One per order handled, most of them never written to: nothing here but the list.
        self.stream = stream
        self.commands: list[list[EncodableT]] = []

    @property
    def tag(self) -> str:
        """The stream's hash tag, which every staged key must share."""
        return hash_tag(self.stream)

    def key(self, name: str) -> str:
        """A key that commits with the order: `{orders}:<name>`."""
        return f"{{{self.tag}}}:{name}"

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        self.call("HINCRBY", key, field, amount)

    def hset(self, key: str, mapping: Mapping[str, EncodableT]) -> None:
        self.call("HSET", key, *(part for pair in mapping.items() for part in pair))

    def incrby(self, key: str, amount: int = 1) -> None:
        self.call("INCRBY", key, amount)

    def sadd(self, key: str, *members: EncodableT) -> None:
        self.call("SADD", key, *members)

    def xadd(self, stream: str, fields: Mapping[str, EncodableT]) -> None:
        """Append an event to another stream (an outbox): the next service sees it once."""
        self.call("XADD", stream, "*", *(part for pair in fields.items() for part in pair))

    def call(self, command: str, key: str, *args: EncodableT) -> None:
        """Stage any write whose first argument is its only key."""
        if hash_tag(key) != self.tag:
            raise CrossSlotWrite(
                f"{command} {key!r}: the key is not in the hash slot of stream {self.stream!r}, so it "
                f"cannot commit with the order; name it {self.key(key)!r} (tx.key() does)"
            )
        self.commands.append([command, key, *args])
