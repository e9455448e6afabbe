"""How many prompt tokens one step may prefill while other agents are decoding.

A prefill chunk's cost is not proportional to its tokens: every token attends to
all the tokens before it, so deep into a long prompt the same 256 tokens cost
several times what they cost at its start (on the CPU, 0.7 s at offset 0 and
3.3 s at offset 3,900 for the embedded model). A fixed token count per step
would therefore let a long prompt delay the decoding agents by more and more.

PrefillBudget keeps the step's *compute* bounded instead. It fits, from the
steps the engine has run,

    prefill seconds ~= a * rows + b * area,   area = sum over sequences of n * (offset + n / 2)

(a: weights, per token row; b: attention, per query-key pair). A step is
bounded when a big one would delay somebody: another sequence decodes, or one
of several prompts could get its first token at the end of this step (its
remainder fits in a chunk: five follow-up turns arriving together would all
wait for one step holding all of them). Otherwise every prompt gets a full chunk
(several long prompts starting together: none can finish in this step, and one
batched step is the cheapest way through). A bounded step may cost what one
`chunk`-token chunk costs at the start of a prompt, handed out shortest
remaining prompt first. A remainder that one step could take whole (a follow-up
turn's short suffix) goes in whole or waits for the next step: splitting it
would cost it a whole extra step, decode included. A long prompt takes what is
left, in chunks of at least MIN_TOKENS. The oldest prefilling sequence always
progresses: nobody waits forever behind newer arrivals.
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


def rows_and_area(seqs: list[Prefilling], takes: list[int]) -> tuple[float, float]:
    """The compute of a step giving sequence i takes[i] tokens."""
    return float(sum(takes)), float(sum(n * (s.offset + n / 2) for s, n in zip(seqs, takes)))


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

    def plan(self, seqs: list[Prefilling], decoding: bool) -> list[int]:
        """Prompt tokens each prefilling sequence (oldest first) gets in the next step,
        `decoding`: whether some other sequence decodes in it."""
        if not seqs:
            return []
        whole = [min(self.chunk, s.remaining) for s in seqs]
        fit = self.coefficients()
        finishing = len(seqs) > 1 and any(s.remaining <= self.chunk for s in seqs)
        if not (decoding or finishing) or fit is None:
            return whole
        a, b = fit
        limit = a * self.chunk + b * self.chunk * self.chunk / 2

        def cost(s: Prefilling, n: int) -> float:
            return a * n + b * n * (s.offset + n / 2)

        room = limit
        takes = [0] * len(seqs)
        for i in sorted(range(len(seqs)), key=lambda i: seqs[i].remaining):
            s = seqs[i]
            lo, hi = 0, whole[i]  # cost grows with n: bisect for the largest n that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if cost(s, mid) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            if lo < whole[i] and (lo < MIN_TOKENS or (s.remaining <= self.chunk and cost(s, s.remaining) <= limit)):
                # A remainder one step could take whole waits for one rather than be
                # split (that costs it a whole extra step); a sliver is mostly overhead.
                lo = 0
            takes[i] = lo
            room -= cost(s, lo)
        if takes[0] == 0:
            takes[0] = min(MIN_TOKENS, whole[0])
        return takes
