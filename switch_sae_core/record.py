"""The results table's record, typed: one `Record` per trained SAE, with its JSON round trip.

`results.make_record` fills a `Record` and writes `Record.to_json()` (a flat dict, one JSON line of
`records.jsonl`); `Record.from_json(line_dict)` reads any committed line back. The round trip is exact:
`Record.from_json(d).to_json() == d` for every record of every table (tests/test_record.py), so
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
import types
import typing
from collections.abc import Mapping
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


class JsonResult(Mapping):
    """Mixin of an analysis's typed result (a dataclass): `to_json()` gives its dict in field order, made of JSON
    values only, and `from_json(d)` the result again, read by the fields' type hints. It is also a read-only
    Mapping of its fields, as the dicts these results used to be (notebooks, sentences, users' code):
    `result["field"]`, `"field" in result`, `result.get(...)`, `dict(result)`, `{**result}`.

    In JSON a tensor is its nested list (read back as a tensor of the field's `tensor_field(dtype)`, else
    float32 / int64 as `torch.tensor` infers), a nested result its dict, a tuple a list, and a dict with
    non-string keys (e.g. (name, scope) tuples) a list of [key, value] pairs. A field made with
    `live_field()` (SAEs, activations) stays out of the JSON and is None in a result read back from it."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("json", True)}

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        values = {f.name: None if not f.metadata.get("json", True) else
                  _from_json(hints[f.name], d[f.name], f.metadata.get("dtype"))
                  for f in dataclasses.fields(cls) if f.name in d or not f.metadata.get("json", True)}
        return cls(**values)

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str) or name not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return (f.name for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return len(dataclasses.fields(self))


def tensor_field(dtype: str, **field_kwargs):
    """A tensor field (or a container of tensors) read back from JSON as `dtype` ('float64', 'int64', ...)."""
    return dataclasses.field(metadata={"dtype": dtype}, **field_kwargs)


def live_field():
    """A field that stays out of the result's JSON (an SAE, a batch of activations): None when read back."""
    return dataclasses.field(metadata={"json": False})


def _to_json(value: Any) -> Any:
    import torch

    if isinstance(value, JsonResult):
        return value.to_json()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return [[_to_json(k), _to_json(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(hint: Any, value: Any, dtype: Optional[str] = None) -> Any:
    """`value` (a JSON value) as the type `hint` says: tensors, nested results, tuples and dicts rebuilt."""
    import torch

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # Optional[X]: the one type that is not None
        (hint,) = [a for a in args if a is not type(None)]
        return _from_json(hint, value, dtype)
    if isinstance(hint, type) and issubclass(hint, JsonResult):
        return hint.from_json(value)
    if hint is torch.Tensor:
        return torch.tensor(value, dtype=getattr(torch, dtype) if dtype else None)
    if origin is dict:
        key_hint, value_hint = args
        pairs = value if isinstance(value, list) else value.items()
        return {_from_json(key_hint, k): _from_json(value_hint, v, dtype) for k, v in pairs}
    if origin is list:
        return [_from_json(args[0], v, dtype) for v in value]
    if origin is tuple:
        hints = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_from_json(h, v, dtype) for h, v in zip(hints, value))
    return value
