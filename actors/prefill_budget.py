"""How many prompt tokens one step may prefill while other agents are decoding.

A prefill chunk's cost is not proportional to its tokens: every token attends to
all the tokens before it, so deep into a long prompt the same 256 tokens cost
several times what they cost at its start (on the CPU, 0.7 s at offset 0 and
3.3 s at offset 3,900 for the embedded model). A fixed token count per step
would therefore let a long prompt delay the decoding agents by more and more.

PrefillBudget keeps the step's *compute* bounded instead. It fits, from the
steps the engine has run,

    prefill seconds ~= a * rows + b * area,   area = sum over sequences of n * (offset + n / 2)

(a: weights, per token row; b: attention, per query-key pair) and, while somebody
is decoding, picks the largest per-sequence chunk n whose estimate stays within
the cost of one `chunk`-token chunk at the start of a prompt. With nobody
decoding there is nobody to delay, and the full chunk is used.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_TOKENS = 16  # below this a step is mostly overhead
DECAY = 0.97  # weight of the past in the running fit (~30 steps of memory)


@dataclass(frozen=True, slots=True)
class Prefilling:
    """One sequence that wants prompt tokens this step."""

    offset: int  # tokens already in its KV cache
    remaining: int  # prompt tokens still to prefill


def rows_and_area(seqs: list[Prefilling], n: int) -> tuple[float, float]:
    """The compute of a step giving each sequence up to n tokens (each sequence's
    chunk is its own model call on its own cache: nothing is padded)."""
    takes = [(min(n, s.remaining), s.offset) for s in seqs]
    return float(sum(m for m, _ in takes)), float(sum(m * (offset + m / 2) for m, offset in takes))


def tokens_in_step(seqs: list[Prefilling], n: int) -> int:
    return sum(min(n, s.remaining) for s in seqs)


class PrefillBudget:
    def __init__(self, chunk: int):
        self.chunk = chunk
        # decayed sums for the least-squares fit of seconds ~ a*rows + b*area
        self._rr = self._ra = self._aa = self._tr = self._ta = 0.0

    def observe(self, rows: float, area: float, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        d = DECAY
        self._rr = d * self._rr + rows * rows
        self._ra = d * self._ra + rows * area
        self._aa = d * self._aa + area * area
        self._tr = d * self._tr + seconds * rows
        self._ta = d * self._ta + seconds * area

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) of the fit, or None before there is enough to fit."""
        if self._rr == 0:
            return None
        det = self._rr * self._aa - self._ra * self._ra
        if det > 1e-9 * self._rr * self._aa:
            a = (self._tr * self._aa - self._ta * self._ra) / det
            b = (self._ta * self._rr - self._tr * self._ra) / det
            if a > 0 and b >= 0:
                return a, b
        # One kind of step only so far (or a fit that makes no sense): charge it all
        # to the tokens, which is what a plain token budget would do.
        return self._tr / self._rr, 0.0

    def tokens_per_sequence(self, seqs: list[Prefilling], decoding: bool) -> int:
        """The chunk each prefilling sequence gets in the next step."""
        fit = self.coefficients()
        if not decoding or not seqs or fit is None:
            return self.chunk
        a, b = fit
        limit = a * self.chunk + b * self.chunk * self.chunk / 2

        def cost(n: int) -> float:
            rows, area = rows_and_area(seqs, n)
            return a * rows + b * area

        if cost(self.chunk) <= limit:
            return self.chunk
        lo, hi = MIN_TOKENS, self.chunk  # cost grows with n: bisect for the largest n that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo
