"""One type per tensor under a byte budget: the choice with the least predicted KLD.

Each tensor offers candidates (type, the bytes choosing it adds to the file, its predicted KLD
contribution). Predicted KLD is additive over tensors (nemoq.calib.profile), so the best file
for a budget is a multiple-choice knapsack, solved exactly by dynamic programming over bytes:

    best_i[u] = min over candidates c of tensor i of  best_{i-1}[u - bytes_c] + kld_c,

best_0[u] = 0, where best_i[u] is the least predicted KLD of the first i tensors in at most u
bytes. Bytes are counted in units of `unit` bytes, each candidate's bytes rounded *up*, so the
chosen file always fits the real budget; with unit = 1 the answer is the exact optimum. The
unit comes from the candidates, never from the budget: the feasible set then only grows with
the budget, and since the DP finds its optimum, a larger budget can never give a higher
predicted KLD (and on ties the DP takes the smaller candidate first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemoq.errors import NemoqError

# Resolution of the byte axis: the largest possible file is split into at most this many
# units (the rounding then costs at most n_tensors / STEPS of the file: 0.2% for 300 tensors).
STEPS = 1 << 17


@dataclass(frozen=True)
class Candidate:
    type: str
    nbytes: int     # what choosing it adds to the file (aligned data, `.scale` companion, header entries)
    kld: float      # its predicted KLD contribution


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]   # tensor -> chosen type
    nbytes: int             # fixed bytes + the chosen candidates' bytes
    kld: float              # predicted KLD: the sum of the chosen contributions


class BudgetTooSmall(NemoqError):
    def __init__(self, budget: int, smallest: int):
        self.budget, self.smallest = budget, smallest
        super().__init__(f"a budget of {budget:,} bytes is below the smallest file this model can be "
                         f"({smallest:,} bytes, every tensor in its smallest type)")


def smallest_size(options: dict[str, list[Candidate]], fixed: int = 0) -> int:
    return fixed + sum(min(c.nbytes for c in cands) for cands in options.values())


def largest_size(options: dict[str, list[Candidate]], fixed: int = 0) -> int:
    return fixed + sum(max(c.nbytes for c in cands) for cands in options.values())


def default_unit(options: dict[str, list[Candidate]]) -> int:
    """Bytes per DP unit: the largest file in at most STEPS units (never depends on the budget)."""
    return max(1, -(-largest_size(options) // STEPS))


def allocate(options: dict[str, list[Candidate]], budget: int, fixed: int = 0,
             unit: int | None = None) -> Allocation:
    """The candidate per tensor minimising the summed KLD with fixed + summed bytes <= budget."""
    if not options:
        raise ValueError("nothing to allocate: no tensor has candidates")
    unit = default_unit(options) if unit is None else unit
    names = list(options)
    cands = [sorted(options[n], key=lambda c: (c.nbytes, c.kld)) for n in names]
    units = [np.array([-(-c.nbytes // unit) for c in cs], np.int64) for cs in cands]
    least = sum(int(u.min()) for u in units)
    room = (budget - fixed) // unit if budget >= fixed else -1
    if room < least:
        if budget < smallest_size(options, fixed):
            raise BudgetTooSmall(budget, smallest_size(options, fixed))
        # fits only unrounded: the smallest candidates (the DP's answer at `least` is no worse)
        return _total(options, fixed, {n: cs[0] for n, cs in zip(names, cands)})
    room = min(room, sum(int(u.max()) for u in units))   # beyond that nothing is left to buy

    best = np.zeros(room + 1)                         # no tensor yet: 0 KLD at any size
    choice = np.empty((len(names), room + 1), np.int16)
    for i, (cs, us) in enumerate(zip(cands, units)):
        new = np.full(room + 1, np.inf)
        pick = np.zeros(room + 1, np.int16)
        for j, (c, u) in enumerate(zip(cs, us)):
            if u > room:
                continue
            total = np.full(room + 1, np.inf)
            total[u:] = best[:room + 1 - u] + c.kld
            better = total < new                      # strict: ties keep the smaller candidate
            new[better], pick[better] = total[better], j
        best, choice[i] = new, pick

    chosen, u = {}, room
    for i in reversed(range(len(names))):
        chosen[names[i]] = cands[i][choice[i, u]]
        u -= int(units[i][choice[i, u]])
    return _total(options, fixed, chosen)


def _total(options: dict[str, list[Candidate]], fixed: int, chosen: dict[str, Candidate]) -> Allocation:
    return Allocation({n: chosen[n].type for n in options}, fixed + sum(c.nbytes for c in chosen.values()),
                      float(sum(chosen[n].kld for n in options)))
