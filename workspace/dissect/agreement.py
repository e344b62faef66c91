"""Agreement between readers on the concepts of units, and the team's rule for the label a report uses.

A reader's **vote** on a unit is what that reader said last about it (``label_events``): the concept of their
latest add, relabel or confirm, or nothing after their remove. Labelling a unit with the concept it already
carries is recorded as a *confirm* when it is another reader's say, so that a second reader who agrees counts.

- Per unit: the readers who voted, and whether they agree (two or more readers, one concept).
- Per concept: the units it has a vote on, how many of those two or more readers voted on, and how many of
  these are agreed (every voter named it) or disputed (it and another concept were named).
- Cohen's kappa for every pair of readers, over the units both voted on; Fleiss' kappa over every unit with
  two or more voters (Fleiss 1971, with the number of raters allowed to vary from unit to unit: P_i =
  sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), p_j = sum_i n_ij / sum_i n_i). A kappa is None when chance
  agreement is 1 (one concept only) or nothing is shared.

The **label rule** (``team_settings``, key ``label_rule``) decides the label a report uses:
``latest`` (the default: the last label given, as before) or ``majority`` (the concept more than half of
the unit's voters named; a unit without one is left unlabelled in reports).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field

RULES = ("latest", "majority")
DEFAULT_RULE = "latest"


@dataclass(frozen=True)
class UnitVotes:
    unit: int
    votes: dict[str, str]          # reader -> concept name

    @property
    def shared(self) -> bool:
        return len(self.votes) >= 2

    @property
    def agreed(self) -> bool:
        return self.shared and len(set(self.votes.values())) == 1

    @property
    def disputed(self) -> bool:
        return self.shared and len(set(self.votes.values())) > 1

    def majority(self) -> str | None:
        """The concept more than half of the voters named, else None."""
        if not self.votes:
            return None
        name, count = Counter(self.votes.values()).most_common(1)[0]
        return name if 2 * count > len(self.votes) else None


@dataclass
class ConceptAgreement:
    name: str
    units: int                     # units with a vote for it
    shared: int                    # ... voted on by two or more readers
    agreed: int                    # ... where every voter named it
    disputed: int                  # ... where another concept was named too


@dataclass
class PairKappa:
    readers: tuple[str, str]
    shared: int                    # units both voted on
    observed: float | None         # the share of those where they agree
    kappa: float | None


@dataclass
class Agreement:
    readers: list[str]
    units: list[UnitVotes]
    concepts: list[ConceptAgreement]
    pairs: list[PairKappa]
    fleiss_kappa: float | None
    n_shared: int
    rule: str = DEFAULT_RULE
    notes: list[str] = field(default_factory=list)

    @property
    def disputed(self) -> list[UnitVotes]:
        return [u for u in self.units if u.disputed]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["units"] = [dict(unit=u.unit, votes=u.votes, agreed=u.agreed, disputed=u.disputed) for u in self.units]
        out["pairs"] = [dict(asdict(p), readers=list(p.readers)) for p in self.pairs]
        return out

    def to_text(self, max_disputed: int = 20) -> str:
        lines = [f"{len(self.readers)} reader(s), {len(self.units)} unit(s) with a vote, {self.n_shared} shared by "
                 f"two or more; Fleiss' kappa {_fmt(self.fleiss_kappa)}; label rule: {self.rule}"]
        if self.concepts:
            lines.append(f"{'concept':32} {'units':>5} {'shared':>6} {'agreed':>6} {'disputed':>8}")
            lines += [f"{c.name[:32]:32} {c.units:>5} {c.shared:>6} {c.agreed:>6} {c.disputed:>8}"
                      for c in self.concepts]
        for pair in self.pairs:
            lines.append(f"Cohen's kappa {pair.readers[0]} / {pair.readers[1]}: {_fmt(pair.kappa)} over "
                         f"{pair.shared} shared unit(s) (agree on {_fmt(pair.observed)})")
        disputed = self.disputed
        for u in disputed[:max_disputed]:
            said = "; ".join(f"{reader}: {name}" for reader, name in sorted(u.votes.items()))
            lines.append(f"disputed unit {u.unit}: {said}")
        if len(disputed) > max_disputed:
            lines.append(f"+{len(disputed) - max_disputed} more disputed units")
        lines += self.notes
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two readers' names for the same units (None: nothing shared, or chance agreement 1)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[c] * second[c] for c in first) / (n * n)
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def fleiss_kappa(counts: list[Counter]) -> float | None:
    """Fleiss' kappa of units rated by two or more readers each (``counts``: per unit, concept -> readers)."""
    rated = [c for c in counts if sum(c.values()) >= 2]
    if not rated:
        return None
    per_unit = [sum(k * (k - 1) for k in c.values()) / (sum(c.values()) * (sum(c.values()) - 1)) for c in rated]
    observed = sum(per_unit) / len(per_unit)
    totals: Counter = Counter()
    for c in rated:
        totals.update(c)
    ratings = sum(totals.values())
    chance = sum((k / ratings) ** 2 for k in totals.values())
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def agreement(votes: dict[int, dict[str, str]], rule: str = DEFAULT_RULE) -> Agreement:
    """The agreement of ``votes`` (``{unit: {reader: concept name}}``, as ``ConceptStore.votes`` gives)."""
    units = [UnitVotes(unit, dict(v)) for unit, v in sorted(votes.items()) if v]
    readers = sorted({r for u in units for r in u.votes})
    concepts = []
    for name in sorted({n for u in units for n in u.votes.values()}, key=str.casefold):
        mine = [u for u in units if name in u.votes.values()]
        shared = [u for u in mine if u.shared]
        concepts.append(ConceptAgreement(name, len(mine), len(shared), sum(u.agreed for u in shared),
                                         sum(u.disputed for u in shared)))
    pairs = []
    for a, b in itertools.combinations(readers, 2):
        both = [(u.votes[a], u.votes[b]) for u in units if a in u.votes and b in u.votes]
        pairs.append(PairKappa((a, b), len(both), sum(x == y for x, y in both) / len(both) if both else None,
                               cohen_kappa(both)))
    shared = [u for u in units if u.shared]
    notes = [] if shared else ["No unit has votes from two readers yet: agreement needs shared units."]
    return Agreement(readers=readers, units=units, concepts=concepts, pairs=pairs,
                     fleiss_kappa=fleiss_kappa([Counter(u.votes.values()) for u in shared]), n_shared=len(shared),
                     rule=rule, notes=notes)


__all__ = ["RULES", "DEFAULT_RULE", "UnitVotes", "ConceptAgreement", "PairKappa", "Agreement", "cohen_kappa",
           "fleiss_kappa", "agreement"]
