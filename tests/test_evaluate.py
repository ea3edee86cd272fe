"""CE loss recovered and KL (evaluate.py) on tiny-random."""
from __future__ import annotations

import math

import pytest
import torch

from switch_sae_core import evaluate as ev
from switch_sae_core.config import DataConfig, SAEConfig
from switch_sae_core.data import lm
from switch_sae_core.saes import build_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return lm.load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def tokens(tiny):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (6, 20), generator=g)
    toks[:, 0] = tiny.tokenizer.bos_token_id
    return toks


@pytest.fixture(scope="module")
def reference(tiny, tokens):
    return ev.prepare_reference(tiny, tokens, HOOK, batch_size=4, progress=False)


def _ce(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_reference_ce_computed_another_way(tiny, tokens, reference):
    assert reference.ce_clean == pytest.approx(_ce(tiny.logits(tokens), tokens), rel=1e-5)
    keep_bos = tokens == tiny.tokenizer.bos_token_id

    def zero_but_bos(a):
        return torch.where(keep_bos.unsqueeze(-1), a, torch.zeros_like(a))

    zero_logits = tiny.logits_with_replacement(tokens, HOOK, zero_but_bos)
    assert reference.ce_zero == pytest.approx(_ce(zero_logits, tokens), rel=1e-5)
    assert not reference.splice_mask[:, 0].any() and reference.splice_mask[:, 1:].all()


def test_identity_recovers_everything_and_zeros_nothing(tiny, reference):
    results = ev.evaluate_saes(tiny, {"identity": lambda x: x, "zeros": torch.zeros_like}, reference, progress=False)
    ident, zeros = results["identity"], results["zeros"]
    assert ident.loss_recovered == pytest.approx(1.0, abs=1e-6) and ident.kl == pytest.approx(0.0, abs=1e-6)
    assert zeros.loss_recovered == pytest.approx(0.0, abs=1e-6) and zeros.kl > 0.01
    assert ident.n_tokens == 6 * 19 and ident.ce_clean == reference.ce_clean


def test_noisy_reconstruction_is_between_and_kl_matches_a_direct_computation(tiny, tokens, reference):
    def noisy(x_ND):  # a deterministic function of x, whatever the batching
        return x_ND + 0.5 * torch.sin(37 * x_ND)

    res = ev.evaluate_sae(tiny, noisy, reference, progress=False)  # (a random model: no bounds on its value)
    spliced = torch.where(reference.splice_mask.unsqueeze(-1), noisy(reference.acts), reference.acts)
    logits = tiny.logits_with_replacement(tokens, HOOK, lambda a: spliced)
    assert res.ce_sae == pytest.approx(_ce(logits, tokens), rel=1e-5)
    p = tiny.logits(tokens)[:, :-1].log_softmax(-1)
    q = logits[:, :-1].log_softmax(-1)
    assert res.kl == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4)
    assert res.loss_recovered == pytest.approx(ev.loss_recovered(res.ce_clean, res.ce_zero, res.ce_sae))


def test_other_hooks_use_the_replacing_hook_path(tiny, tokens):
    ref = ev.prepare_reference(tiny, tokens, "blocks.1.hook_mlp_out", batch_size=4, progress=False)
    res = ev.evaluate_sae(tiny, lambda x: x, ref, progress=False)
    assert res.loss_recovered == pytest.approx(1.0, abs=1e-6)


def test_keep_special_clean_false_splices_bos_too(tiny, tokens):
    ref = ev.prepare_reference(tiny, tokens, HOOK, keep_special_clean=False, progress=False)
    assert ref.splice_mask.all()


def test_an_sae_module_and_the_store_evaluator(tiny, tmp_path):
    from switch_sae_core.data.store import ActivationStore

    cfg = DataConfig(model="tiny-random", layer=0, context_len=16, n_train_tokens=64, n_eval_tokens=48,
                     cache_dir=str(tmp_path))
    store = ActivationStore.build_or_load(cfg, model=tiny, progress=False)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="topk", d_in=tiny.d_model, n_features=128, k=8))
    evaluator = ev.make_lm_evaluator(store, model=tiny, progress=False)
    out = evaluator(sae)
    assert set(out) == {"ce_clean", "ce_sae", "ce_zero", "loss_recovered", "kl", "n_tokens"}
    assert out["n_tokens"] == 3 * 15 and math.isfinite(out["loss_recovered"])
    assert evaluator(lambda x: x)["loss_recovered"] == pytest.approx(1.0, abs=1e-6)


def test_loss_recovered_formula():
    assert ev.loss_recovered(2.0, 6.0, 3.0) == 0.75
    assert math.isnan(ev.loss_recovered(2.0, 2.0, 2.0))


@pytest.mark.slow
def test_smollm2_loss_recovered_orders_reconstructions():
    """On a real model: identity 1, zeros 0, a noisy reconstruction strictly between."""
    model = lm.load_model("smollm2-135m", device="cpu")
    from switch_sae_core.data import text

    contexts = text.contexts(text.documents("offline"), model.tokenizer, 32, model.prepend_bos)
    tokens = torch.stack([next(contexts) for _ in range(1)])
    ref = ev.prepare_reference(model, tokens, "blocks.20.hook_resid_post", progress=False)
    assert ref.ce_zero > ref.ce_clean + 1  # zero-ablating layer 20 hurts a real model
    res = ev.evaluate_saes(model, {"id": lambda x: x, "zero": torch.zeros_like,
                                   "noisy": lambda x: x + 0.3 * x.norm(dim=-1, keepdim=True) * torch.sin(37 * x) / 24},
                           ref, progress=False)
    assert res["id"].loss_recovered == pytest.approx(1, abs=1e-6) and res["zero"].loss_recovered == pytest.approx(0, abs=1e-6)
    assert 0 < res["noisy"].loss_recovered < 1 and res["noisy"].kl > 0
