"""The rank plan: which width every compressible module keeps. Saved as JSON beside the slim weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import SlimDiffError
from .families import FFN, ModuleSite

PLAN_FORMAT = "slimdiff-plan/1"


@dataclass(frozen=True)
class PlanEntry:
    kind: str
    width: int
    rank: int
    heads: int
    unit_params: int
    attention: str | None = None  # "self" | "cross" for attention groups

    @property
    def params_removed(self) -> int:
        return (self.width - self.rank) * self.unit_params


@dataclass(frozen=True)
class RankPlan:
    """Module name → kept width, plus how the plan was made (free-form, recorded for provenance)."""

    modules: dict[str, PlanEntry]
    info: dict = field(default_factory=dict)

    @classmethod
    def from_ranks(cls, sites: list[ModuleSite], ranks: dict[str, int], info: dict | None = None) -> "RankPlan":
        entries = {}
        for s in sites:
            rank = ranks.get(s.name, s.width)
            if not 0 < rank <= s.width:
                raise SlimDiffError(f"rank {rank} for {s.name} is outside 1..{s.width}")
            entries[s.name] = PlanEntry(s.kind, s.width, rank, s.heads, s.unit_params, s.attention)
        return cls(entries, dict(info or {}))

    @property
    def params_removed(self) -> int:
        return sum(e.params_removed for e in self.modules.values())

    @property
    def compressible_params(self) -> int:
        return sum(e.width * e.unit_params for e in self.modules.values())

    def removed_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.modules.values():
            key = e.kind if e.kind == FFN else f"{e.kind}-{e.attention}"
            out[key] = out.get(key, 0) + e.params_removed
        return out

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "info": self.info, "modules": {n: asdict(e) for n, e in self.modules.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, body: dict) -> "RankPlan":
        try:
            if body.get("format") != PLAN_FORMAT:
                raise SlimDiffError(f"unsupported rank plan format {body.get('format')!r} (expected {PLAN_FORMAT})")
            return cls({n: _entry(n, e) for n, e in body["modules"].items()}, body.get("info", {}))
        except (AttributeError, KeyError, TypeError) as exc:
            raise SlimDiffError(f"corrupt rank plan: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SlimDiffError(f"corrupt rank plan: {exc}") from exc
        return cls.from_dict(body)


def _entry(name: str, fields: dict) -> PlanEntry:
    if fields.get("kind") != FFN and "attention" not in fields:
        # Plans written before entries recorded self/cross: SD UNets named cross-attention "attn2".
        fields = {**fields, "attention": "cross" if ".attn2." in name else "self"}
    return PlanEntry(**fields)
