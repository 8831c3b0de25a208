"""What a transactional handler stages: Redis writes applied with its order's commit, or never.

A handler that takes a second argument gets a `Tx`. The writes it stages are applied in the
same atomic step that acks the entry (the fenced commit in core/library.lua): if the consumer
dies first, or another consumer took the entry over, none of them is applied; if the commit
is sent twice (a lost reply), they are applied once. On Redis Cluster that step runs in one
hash slot, so every key a write names must share the stream's hash tag: `tx.key("stock")`
names one that does. A write that could not commit (a key outside the slot, a command whose
keys are unknown here, too many arguments) is refused where it is staged: the handler raises,
and the order is dead-lettered at once, since running it again cannot help.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.typing import EncodableT

from core.keys import hash_tag

# Arguments of one staged write, command included: the commit applies it from inside a Redis
# Function, whose Lua stack holds about 8,000 values (core/library.lua's MAX_ARGS).
MAX_WRITE_ARGS = 4000

_ONE_KEY = (1, 1, 1)
_ALL_KEYS = (1, -1, 1)
_TWO_KEYS = (1, 2, 1)


# Where the keys of each write command are among its arguments: (first, last, step), counted
# from 1 after the command's name, as COMMAND INFO gives them; last -1 means "to the end".
# ZUNIONSTORE and its kin name their key count; _keys_of reads it.
def _each(names: str, where: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    return dict.fromkeys(names.split(), where)


KEY_POSITIONS: dict[str, tuple[int, int, int]] = {
    **_each(
        "SET SETEX PSETEX SETNX GETSET GETDEL APPEND INCR INCRBY INCRBYFLOAT DECR DECRBY SETRANGE SETBIT "
        "BITFIELD EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST HSET HSETNX HMSET HDEL HINCRBY HINCRBYFLOAT "
        "SADD SREM SPOP ZADD ZREM ZINCRBY ZREMRANGEBYSCORE ZREMRANGEBYRANK ZREMRANGEBYLEX ZPOPMIN ZPOPMAX "
        "LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP LREM LSET LTRIM LINSERT XADD XTRIM XDEL PFADD GEOADD",
        _ONE_KEY,
    ),
    **_each("DEL UNLINK SINTERSTORE SUNIONSTORE SDIFFSTORE PFMERGE", _ALL_KEYS),
    **_each("SMOVE RPOPLPUSH LMOVE RENAME RENAMENX COPY", _TWO_KEYS),
    **_each("MSET MSETNX", (1, -1, 2)),
}
_WITH_KEY_COUNT = frozenset(("ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"))


class UncommittableWrite(ValueError):
    """A staged write the commit could not apply as one step with the order: never staged. Raised
    from the handler, it dead-letters the order at once, as Reject does: running it again cannot help."""


class CrossSlotWrite(UncommittableWrite):
    """A staged write to a key outside the stream's hash slot."""


def _keys_of(command: str, args: tuple[EncodableT, ...]) -> list[EncodableT]:
    """The keys among a write's arguments; UncommittableWrite when the command is not known here."""
    name = command.upper()
    if name in _WITH_KEY_COUNT:  # destination, numkeys, key ...
        try:
            count = int(args[1])
        except (IndexError, TypeError, ValueError):
            raise UncommittableWrite(f"{name} needs a destination and a key count") from None
        return [args[0], *args[2 : 2 + count]]
    if name not in KEY_POSITIONS:
        raise UncommittableWrite(
            f"tx.call does not know where {name}'s keys are, so it cannot check they commit with the "
            f"order; known: {', '.join(sorted([*KEY_POSITIONS, *_WITH_KEY_COUNT]))}"
        )
    first, last, step = KEY_POSITIONS[name]
    end = len(args) if last == -1 else min(last, len(args))
    return list(args[first - 1 : end : step])


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

    def xadd(self, stream: str, fields: Mapping[str, EncodableT], maxlen: int | None = None) -> None:
        """Append an event to another stream (an outbox): the next service sees it once.

        `maxlen`: keep about that many newest events (XADD MAXLEN ~), for an outbox nothing trims.
        """
        bound: tuple[EncodableT, ...] = () if maxlen is None else ("MAXLEN", "~", maxlen)
        self.call("XADD", stream, *bound, "*", *(part for pair in fields.items() for part in pair))

    def call(self, command: str, *args: EncodableT) -> None:
        """Stage any write command whose keys this module knows (KEY_POSITIONS); every key is checked."""
        if 1 + len(args) > MAX_WRITE_ARGS:
            raise UncommittableWrite(
                f"{command} with {1 + len(args):,} arguments: a staged write may have at most "
                f"{MAX_WRITE_ARGS:,}; split it into several"
            )
        for key in _keys_of(command, args):
            name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            if hash_tag(name) != self.tag:
                raise CrossSlotWrite(
                    f"{command} {name!r}: the key is not in the hash slot of stream {self.stream!r}, so "
                    f"it cannot commit with the order; name it {self.key(name)!r} (tx.key() does)"
                )
        self.commands.append([command, *args])
