"""record.Record: the results table's typed record. Its JSON round trip is exact, on records made now and on
every line of every committed table (so the tables load unchanged and a record is written as its dict was)."""
import dataclasses
import json

import pytest

from switch_sae_core.paths import project_root
from switch_sae_core.record import ABSENT, OPTIONAL_FIELDS, Record

TABLES = sorted((project_root() / "data" / "results").glob("*/records.jsonl"))


def test_there_are_committed_tables_to_check():
    assert len(TABLES) >= 3 and sum(len(p.read_text().splitlines()) for p in TABLES) > 100


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.parent.name)
def test_every_committed_record_loads_and_dumps_back_to_the_same_line(path):
    for line in path.read_text().splitlines():
        record = Record.from_json(json.loads(line))
        assert json.dumps(record.to_json(), sort_keys=True) == line  # byte for byte, as results.append_record writes
        assert isinstance(record.mse, float) and isinstance(record.sae_config, dict)


def _a_record(**changes) -> Record:
    fields = {f.name: None for f in dataclasses.fields(Record) if f.name != "extra" and f.default is dataclasses.MISSING}
    fields.update(key="4bd785bb3b18223d", name="topk_M8_k2", mse=1.5, curve={"step": [1, 2], "mse": [3.0, 2.0]},
                  flops={"total": 10}, sae_config={"arch": "topk", "k": 2})
    return Record(**{**fields, **changes})


def test_a_record_round_trips_through_json_with_its_optional_fields_and_extras():
    for record in (_a_record(), _a_record(continued_from_step=8, curve_rows=None, data_content="ab12",
                                          wall_clock_s=1.25, extra={"arm": "alpha", "command": "x"})):
        again = Record.from_json(json.loads(json.dumps(record.to_json(), sort_keys=True)))
        assert again == record


def test_absent_optional_fields_stay_absent_and_none_stays_none():
    d = _a_record(curve_rows=None).to_json()
    assert d["curve_rows"] is None  # present, with the value None
    assert not {"delta_ce", "continued_from_step", "data_content", "wall_clock_s"} & set(d)  # never written
    assert Record.from_json(d).continued_from_step is ABSENT
    assert set(OPTIONAL_FIELDS) == {"delta_ce", "data_content", "continued_from_step", "curve_rows", "wall_clock_s"}


def test_a_line_without_a_schema_field_is_refused_naming_it():
    d = _a_record().to_json()
    del d["mse"]
    with pytest.raises(KeyError, match="'mse'"):
        Record.from_json(d)


STABILITY = project_root() / "data" / "results" / "stability" / "quick" / "records.jsonl"


def test_stability_results_are_typed_and_the_committed_table_round_trips():
    import torch

    from switch_sae_core.analysis.stability import StabilityPair, StabilitySummary, stability_rows, summarize

    lines = STABILITY.read_text().splitlines()
    assert lines
    for line in lines:  # written as scripts/feature_quality.py writes them (field order, no sort)
        assert json.dumps(StabilityPair.from_json(json.loads(line)).to_json()) == line
    g = torch.Generator().manual_seed(0)
    dirs = {"topk": {s: torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1) for s in (0, 1)}}
    rows = stability_rows(dirs)
    assert all(isinstance(r, StabilityPair) for r in rows) and len(rows) == 2
    assert all(StabilityPair.from_json(json.loads(json.dumps(r.to_json()))) == r for r in rows)
    (s,) = summarize(rows)
    assert isinstance(s, StabilitySummary) and StabilitySummary.from_json(s.to_json()) == s
    assert s["n"] == s.n == 2  # read as a dict too (the sentences and the notebooks do)
    assert summarize([r.to_json() for r in rows]) == [s]  # the table's dicts summarize to the same result


def test_every_committed_content_digest_is_the_one_this_install_computes():
    """The data content digest must not depend on the install: from the corpus and model files a fresh clone
    installs, it computes the digest each committed record carries (one that hashed the offline corpus package's
    `__pycache__` bytecode did not, and every such record was silently dropped by the tables' readers)."""
    from switch_sae_core.config import DataConfig
    from switch_sae_core.results import current_data_content

    import subprocess

    tracked = subprocess.run(["git", "ls-files", "data/results"], cwd=project_root(), capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout: the committed tables cannot be told from local ones")
    recorded: dict[str, set] = {}
    for name in (n for n in tracked.stdout.split() if n.endswith("records.jsonl")):
        for line in (project_root() / name).read_text().splitlines():
            r = json.loads(line)
            if r.get("data_content"):
                recorded.setdefault(json.dumps(r["data_config"], sort_keys=True), set()).add(r["data_content"])
    assert len(recorded) >= 3
    checked = 0
    for data, digests in recorded.items():
        here = current_data_content(DataConfig.from_dict(json.loads(data)))
        if here is not None:  # None: this data's model is not installed here
            assert digests == {here}, f"records of {data} carry {digests}, this install computes {here}"
            checked += 1
    if checked < 3:
        pytest.skip(f"only {checked} of the tables' data configs have their model and corpus installed here")
