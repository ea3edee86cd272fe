"""interop.synthsaebench: SAELens's synthetic model, stream and evaluator around our SAEs (needs sae-lens: run by
scripts/test_tl3.sh; skipped elsewhere, saying so)."""
import numpy as np
import pytest
import torch

sb = pytest.importorskip("switch_sae_core.interop.synthsaebench")
pytest.importorskip("sae_lens", reason="sae-lens is not installed here (scripts/test_tl3.sh runs these tests)")

from switch_sae_core.config import SAEConfig  # noqa: E402
from switch_sae_core.interop.sae_lens import to_sae_lens  # noqa: E402
from switch_sae_core.results import load_records  # noqa: E402
from switch_sae_core.saes import build_sae  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sb.load_or_build_model(sb.SCALES["ci"], tmp_path_factory.mktemp("m") / "model")


def test_the_model_is_built_once_and_reloaded_identically(model, tmp_path):
    d = tmp_path / "model"
    a = sb.load_or_build_model(sb.SCALES["ci"], d)
    b = sb.load_or_build_model(sb.SCALES["ci"], d)  # from disk now
    assert torch.equal(a.feature_dict.feature_vectors, b.feature_dict.feature_vectors)
    assert torch.equal(a.feature_dict.feature_vectors, model.feature_dict.feature_vectors)  # the config's seed


def test_one_stream_for_every_seed_and_it_wraps(model, tmp_path):
    rows = sb.generate_activations(model, 100, tmp_path / "x.npy", seed=1)
    src = sb.ArraySource(rows)
    a, b = next(src.batches(30, seed=0, start=3)), next(src.batches(30, seed=7, start=3))
    assert torch.equal(a, b)  # seeds change only the initialisation, never the data
    assert torch.equal(a, torch.from_numpy(np.concatenate([rows[90:], rows[:20]]).astype(np.float32)))


def test_the_true_dictionary_scores_a_perfect_mcc(model):
    """An SAE whose decoder IS the true feature dictionary: SAELens's MCC 1 and uniqueness 1, whatever the k."""
    true_FD = model.feature_dict.feature_vectors.detach()
    F, D = true_FD.shape
    sae = build_sae(SAEConfig(arch="topk", d_in=D, n_features=F, k=8))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(true_FD, dim=-1))
        sae.W_enc.copy_(sae.W_dec)
    scores = sb.evaluate(to_sae_lens(sae), model, n_samples=500, seed=0)
    assert scores["mcc"] > 0.999 and scores["uniqueness"] == 1.0
    assert 0 <= scores["f1"] <= 1 and scores["sae_l0"] <= 8


def test_the_grid_appends_one_record_per_sae_and_resumes(tmp_path):
    out = tmp_path / "out"
    kw = dict(out=out, cache=tmp_path / "cache", steps=6, batch_size=32, seeds=(0,), eval_samples=256,
              only=["topk", "sae-lens topk", "scale (8x)"])
    path = sb.run_grid("ci", **kw)
    recs = load_records(path)
    assert sorted((r["label"], r["steps"]) for r in recs) == sorted(
        (label, s) for label in kw["only"] for s in (6, 12))  # the 2x-rule runs too
    assert all(0 <= r["mcc"] <= 1 and r["mse"] > 0 for r in recs)
    sb.run_grid("ci", **kw)  # everything is in: nothing retrained
    assert len(load_records(path)) == len(recs)
