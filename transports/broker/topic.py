"""Topic matching for the broker (AMQP semantics: '*' is one word, '#' zero or more)."""
from __future__ import annotations


class TopicPattern:
    """A binding key compiled once for matching: an NFA over its word positions run as
    bitsets (Python ints), so one routing-key word costs a few integer operations
    whatever the pattern. '#.#' is collapsed to '#' (it matches the same keys), so one
    shift closes over "'#' may match no word"."""

    __slots__ = ("n", "hashes", "stars", "literals")

    def __init__(self, key: bytes):
        parts: list[bytes] = []
        for w in key.split(b"."):
            if not (w == b"#" and parts and parts[-1] == b"#"):
                parts.append(w)
        self.n = len(parts)
        self.hashes = self.stars = 0
        self.literals: dict = {}
        for i, w in enumerate(parts):
            if w == b"#":
                self.hashes |= 1 << i
            elif w == b"*":
                self.stars |= 1 << i
            else:
                self.literals[w] = self.literals.get(w, 0) | (1 << i)

    def matches(self, words: list[bytes]) -> bool:
        hashes, stars, literals = self.hashes, self.stars, self.literals
        reach = 1 | (1 & hashes) << 1
        for word in words:
            # A '#' at i eats the word and stays; '*' or the same literal moves on.
            nxt = (reach & hashes) | ((reach & (stars | literals.get(word, 0))) << 1)
            if not nxt:
                return False
            reach = nxt | (nxt & hashes) << 1
        return bool(reach >> self.n & 1)


def is_wildcard(key: bytes) -> bool:
    """Whether binding ``key`` has a '*' or '#' word (else it matches only itself)."""
    return any(w == b"*" or w == b"#" for w in key.split(b"."))


def topic_matches(pattern: list[bytes], words: list[bytes]) -> bool:
    """Whether routing key ``words`` match binding ``pattern`` (AMQP's topic rules)."""
    return TopicPattern(b".".join(pattern)).matches(words)
