"""The results table's record, typed: one `Record` per trained SAE, with its JSON round trip.

`results.make_record` fills a `Record` and writes `Record.to_json()` (a flat dict, one JSON line of
`records.jsonl`); `Record.from_json(line_dict)` reads any committed line back. The round trip is exact:
`Record.from_json(d).to_json() == d` for every record of every table (tests/test_records_frame.py), so
the committed tables load unchanged and a record written now is byte for byte what the dict was.

Three kinds of field:
- the schema's fields, always written;
- `OPTIONAL_FIELDS`, written by newer code only (a record from before they existed lacks them): `ABSENT`
  in a `Record` read from such a line, and left out again by `to_json`;
- anything else a script added to its own table (an ablation's `arm`, the `command` that made it):
  kept in `extra`, written back as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


class _Absent:
    """A field the record's line does not have (older code did not write it)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclasses.dataclass
class Record:
    """One row of the results table (`results.make_record` documents each number's source)."""

    key: str
    """`keys.config_hash` of the SAE, train and data configs."""
    run_fingerprint: str
    profile: str
    name: str
    label: str
    setting: str
    """'baseline', 'fixed_width' or 'flop_matched' (`results.setting_of`)."""
    arch: str
    n_experts: int
    n_features: int
    expert_width: int
    k: Optional[int]
    l1_coeff: Optional[float]
    steps: int
    batch_size: int
    tokens: int
    mse: float
    """Held-out MSE, summed over d (`heldout.reconstruction_metrics`)."""
    fvu: float
    l0: float
    dead_fraction_heldout: float
    loss_recovered: Optional[float]
    kl: Optional[float]
    ce_clean: Optional[float]
    ce_sae: Optional[float]
    ce_zero: Optional[float]
    dead_fraction: Optional[float]
    flops_per_input: int
    flops: dict[str, int]
    n_params: int
    train_seconds: Optional[float]
    eval_seconds: float
    curve: dict[str, list]
    """The held-out MSE curve: {'step': [...], 'mse': [...]}."""
    seed: int
    git_commit: str
    sae_config: dict[str, Any]
    train_config: dict[str, Any]
    data_config: dict[str, Any]
    finished_at: str
    delta_ce: Optional[float] = ABSENT
    """CE_sae - CE_clean in nats (records before it have it derived by `results.records_frame`)."""
    data_content: Optional[str] = ABSENT
    """`data.store.content_digest` of the activations it was trained on (None: not an activation cache)."""
    continued_from_step: Optional[int] = ABSENT
    curve_rows: Optional[int] = ABSENT
    wall_clock_s: Optional[float] = ABSENT
    """The sweep's seconds for this SAE in its process (training there + evaluation); not written by `train`."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keys outside the schema, as a script wrote them."""

    def to_json(self) -> dict[str, Any]:
        """The record's line as a dict (json.dumps(..., sort_keys=True) writes it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not ABSENT}, **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        """A record from its line's dict; KeyError naming the missing fields if a schema field is missing."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise KeyError(f"a results record lacks {missing}: not a record of the results table")
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


OPTIONAL_FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.default is ABSENT)


class JsonResult:
    """Mixin of an analysis's typed result (a dataclass of JSON values): `to_json()` gives its dict in field order,
    `from_json(d)` the result again, and `result["field"]` reads a field as the dicts these results used to be
    read (notebooks, sentences) still do."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        return cls(**d)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)
