"""SAELens interoperability (interop/sae_lens.py). Needs sae_lens, i.e. transformer_lens 3.x: runs in the TL 3.9
environment (scripts/test_tl3.sh); elsewhere only the missing-package message is tested."""
from __future__ import annotations

import json

import pytest
import torch

from switch_sae_core.config import SAEConfig
from switch_sae_core.interop import sae_lens as interop
from switch_sae_core.interop.sae_lens import InteropError, from_sae_lens, to_sae_lens
from switch_sae_core.saes import build_sae

from conftest import randomize_biases

pytestmark = pytest.mark.tl3
HOOK = "blocks.0.hook_resid_post"
D = 16
CASES = {
    "topk": dict(arch="topk"),
    "relu": dict(arch="relu"),
    "gated": dict(arch="gated"),
    "batchtopk": dict(arch="batchtopk"),  # saved as a SAELens "jumprelu" with one threshold (SAELens's convention)
    "jumprelu": dict(arch="jumprelu"),
    "switch": dict(arch="switch", n_experts=4),
    "switch-top2-shared-heaviside": dict(arch="switch", n_experts=4, top_e=2, shared_expert=True,
                                         scale_by_router_prob=False),
    "switch-scale": dict(arch="switch", n_experts=4, top_e=2, global_topk=True, feature_scaling=True),
}


@pytest.fixture
def sl():
    return pytest.importorskip("sae_lens")


def make(case: str, d_in: int = D, seed: int = 0):
    torch.manual_seed(seed)
    sae = randomize_biases(build_sae(SAEConfig(d_in=d_in, n_features=4 * d_in, k=4, **CASES[case])), seed)
    with torch.no_grad():  # free decoder norms (ReLU) and a router that really discriminates
        if case == "relu":
            sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1) + 0.5)
        if hasattr(sae, "W_router"):
            sae.W_router.mul_(5)
        if case == "batchtopk":  # a trained threshold, and the per-input (eval-mode) forward SAELens runs
            sae.threshold.fill_(0.7)
            sae.eval()
        if case == "jumprelu":  # thresholds that switch some latents off
            sae.log_threshold.copy_(torch.log(torch.rand(sae.log_threshold.shape) + 0.2))
        if sae.cfg.feature_scaling:  # Scale SAE: a non-trivial high-frequency scale (exported folded into W_enc)
            sae.W_enc_hf_scale.normal_()
    return sae


def dense_latents(sae, out) -> torch.Tensor:
    """(B, n_latents) our latents in SAELens's convention: dense; a Switch SAE's scaled by their expert's gate
    (router probability, or 1 for the Heaviside variant and the shared expert)."""
    if out.latent_indices is None:
        return out.latent_acts
    acts = out.latent_acts
    if hasattr(out, "router_probs"):
        expert = out.latent_indices // sae.cfg.expert_width
        gate = out.router_probs.gather(1, expert.clamp(max=sae.cfg.n_experts - 1))
        routed_and_scaled = (expert < sae.cfg.n_experts) & sae.cfg.scale_by_router_prob
        acts = acts * torch.where(routed_and_scaled, gate, torch.ones_like(gate))
    return torch.zeros(acts.shape[0], sae.n_latents).scatter_add(1, out.latent_indices, acts)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_sae_lens_with_our_numbers(sl, case, tmp_path):
    sae = make(case)
    to_sae_lens(sae, tmp_path, hook_name=HOOK, model_name="tiny")
    loaded = sl.SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == {"relu": "standard", "batchtopk": "jumprelu"}.get(case, CASES[case]["arch"])
    x = torch.randn(64, D) * 2
    out = sae(x)
    feats = loaded.encode(x)
    assert (loaded(x) - out.x_hat).abs().max() < 1e-5
    assert (loaded.decode(feats) - out.x_hat).abs().max() < 1e-5
    assert (feats - dense_latents(sae, out)).abs().max() < 1e-5
    assert 0 < (feats != 0).float().mean() < 1
    assert (feats - sae.encode(x)).abs().max() < 1e-5  # our encode is SAELens's encode
    assert (loaded(x.reshape(8, 8, D)) - out.x_hat.reshape(8, 8, D)).abs().max() < 1e-5  # (batch, seq, d) too
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["d_sae"] == sae.n_latents


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_memory_conversion_without_a_language_model(sl, case, tmp_path, monkeypatch):
    """to_sae_lens(sae): no folder, no hook_name; SAELens's encode/decode/W_dec are our encode/decode/W_dec_flat."""
    monkeypatch.chdir(tmp_path)
    sae = make(case)
    loaded = to_sae_lens(sae)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert isinstance(loaded, sl.SAE) and loaded.cfg.metadata.hook_name is None
    x = torch.randn(64, D) * 2
    z = sae.encode(x)
    assert (loaded.encode(x) - z).abs().max() < 1e-5
    assert (loaded.decode(z) - sae.decode(z)).abs().max() < 1e-5
    assert torch.equal(loaded.W_dec.detach(), sae.W_dec_flat.detach())
    back = from_sae_lens(loaded).train(sae.training)  # BatchTopK: compare the same (per-input) mode
    assert back.cfg == sae.cfg and (back(x).x_hat - sae(x).x_hat).abs().max() < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_back_the_same_sae(sl, case, tmp_path):
    sae = make(case)
    to_sae_lens(sae, tmp_path, hook_name=HOOK)
    back = from_sae_lens(tmp_path)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    if sae.cfg.feature_scaling:  # folded on export: the same encoder rows, the scale back at 0
        assert torch.allclose(back.encoder_directions(), sae.encoder_directions(), atol=1e-6)
        assert torch.equal(back.W_enc_hf_scale, torch.zeros_like(sae.W_enc_hf_scale))
        x = torch.randn(64, D) * 2
        assert (back(x).x_hat - sae(x).x_hat).abs().max() < 1e-5
        return
    for name, p in sae.state_dict().items():
        assert torch.allclose(back.state_dict()[name], p, atol=1e-6), name


def test_switch_routing_is_real_in_sae_lens(sl, tmp_path):
    """Latents outside the routed expert are zero, and the router's choice decides which expert fires."""
    sae = make("switch")
    loaded = to_sae_lens(sae, tmp_path, hook_name=HOOK)
    x = torch.randn(256, D) * 2
    feats = loaded.encode(x).reshape(256, 4, -1)
    active_experts = (feats != 0).any(-1)
    assert active_experts.sum(1).le(1).all()
    fired = active_experts.any(1)
    assert torch.equal(active_experts[fired].float().argmax(1), sae(x).expert_indices[fired, 0])
    assert len(set(sae(x).expert_indices[:, 0].tolist())) > 1


def _native(sl, arch: str, seed: int = 0, **cfg):
    """A SAELens SAE with random weights, biases and decoder norms."""
    torch.manual_seed(seed)
    cls, cfg_cls = {"topk": (sl.TopKSAE, sl.TopKSAEConfig), "standard": (sl.StandardSAE, sl.StandardSAEConfig),
                    "gated": (sl.GatedSAE, sl.GatedSAEConfig), "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig)}[arch]
    sae = cls(cfg_cls(d_in=D, d_sae=48, **cfg))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.ndim == 1 else D**-0.5))  # rows of norm ~1
        if arch == "topk":
            sae.b_enc.zero_()
    return sae


@pytest.mark.parametrize("arch,cfg", [
    ("topk", dict(k=6, rescale_acts_by_decoder_norm=True)),
    ("topk", dict(k=6, rescale_acts_by_decoder_norm=False)),
    ("standard", dict(apply_b_dec_to_input=True)),
    ("standard", dict(apply_b_dec_to_input=False)),
    ("gated", dict(apply_b_dec_to_input=False)),
    ("jumprelu", dict(apply_b_dec_to_input=True)),  # random thresholds, some <= 0 (then ReLU)
    ("jumprelu", dict(apply_b_dec_to_input=False)),
])
def test_sae_lens_sae_as_ours(sl, arch, cfg, tmp_path):
    native = _native(sl, arch, **cfg)
    native.save_model(tmp_path)
    x = torch.randn(64, D)
    for ours in (from_sae_lens(native), from_sae_lens(tmp_path)):
        assert ours.cfg.arch == {"standard": "relu"}.get(arch, arch)
        assert (ours(x).x_hat - native(x)).abs().max() < 1e-5


def test_refusals_are_one_line_and_name_the_fix(sl, tmp_path):
    biased = _native(sl, "topk", k=6)
    with torch.no_grad():
        biased.b_enc.fill_(0.1)
    cases = [
        (lambda: from_sae_lens(biased), "nonzero encoder bias.*use the SAELens SAE itself"),
        (lambda: from_sae_lens(sl.Transcoder(sl.TranscoderConfig(d_in=D, d_sae=48, d_out=D, apply_b_dec_to_input=False))),
         "'transcoder' has no switch_sae_core equivalent"),
        (lambda: from_sae_lens(_native(sl, "standard", normalize_activations="layer_norm")), "fold it into the weights"),
        (lambda: from_sae_lens(tmp_path / "nowhere"), "not a SAELens SAE folder: cfg.json is missing"),
        (lambda: to_sae_lens(torch.nn.Linear(2, 2), tmp_path, hook_name=HOOK), "expects a switch_sae_core SAE"),
    ]
    _native(sl, "jumprelu").save_model(tmp_path / "jr")
    cfg = json.loads((tmp_path / "jr" / "cfg.json").read_text())
    (tmp_path / "jr" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu_transcoder"}))
    cases.append((lambda: from_sae_lens(tmp_path / "jr"), "'jumprelu_transcoder' in .* use sae_lens.SAE.load_from_disk"))
    for call, match in cases:
        with pytest.raises(InteropError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_the_export_carries_where_the_sae_was_trained_and_the_import_keeps_it(sl, tmp_path):
    import json

    sae = make("switch")
    sae.trained_on = {"model": "tiny-random", "hook": HOOK, "layer": 0}
    to_sae_lens(sae, tmp_path / "a")  # hook_name and model_name from where it was trained
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    meta = cfg.get("metadata", cfg)
    assert (meta["model_name"], meta["hook_name"]) == ("tiny-random", HOOK)
    assert from_sae_lens(tmp_path / "a").trained_on == {"model": "tiny-random", "hook": HOOK, "layer": 0}
    with pytest.raises(InteropError, match="'blocks.1.hook_resid_post' is not the 'blocks.0.hook_resid_post' the SAE"):
        to_sae_lens(sae, tmp_path / "b", hook_name="blocks.1.hook_resid_post")
    # no recorded site and no hook given (in-memory or synthetic activations): exported without a hook
    assert to_sae_lens(make("topk"), tmp_path / "c").cfg.metadata.hook_name is None


def test_missing_sae_lens_says_how_to_install(monkeypatch, tmp_path):
    if interop.sae_lens is not None:  # simulate the main environment
        monkeypatch.setattr(interop, "sae_lens", None)
        monkeypatch.setattr(interop, "_IMPORT_ERROR", ImportError("No module named 'sae_lens'"), raising=False)
    for call in (lambda: to_sae_lens(make("topk"), tmp_path, hook_name=HOOK), lambda: from_sae_lens(tmp_path)):
        with pytest.raises(InteropError, match=r"sae_lens is not importable here .*pip install sae-lens"):
            call()


def test_hooked_sae_transformer_ce_equals_our_evaluate(sl, tmp_path):
    """The exported Switch SAE spliced in by SAELens's HookedSAETransformer gives the CE loss of our evaluate."""
    from transformer_lens import HookedTransformerConfig

    from switch_sae_core import evaluate as ev
    from switch_sae_core.data.lm import LanguageModel
    from switch_sae_core.data.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=32, d_head=4, n_heads=4, d_vocab=50, act_fn="gelu",
                                  normalization_type="LN", device="cpu")
    model = sl.HookedSAETransformer(cfg).eval()
    tokens = torch.randint(0, 50, (6, 24))
    sae = make("switch")
    with torch.no_grad():  # a reconstruction close enough to matter but not perfect
        acts = model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK].flatten(0, 1)
        sae.b_pre.copy_(acts.mean(0))
        sae.b_router.copy_(acts.mean(0))
    lm = LanguageModel("tiny", model, ByteTokenizer(), backend="hooked")
    reference = ev.prepare_reference(lm, tokens, HOOK, keep_special_clean=False, batch_size=4, progress=False)
    ours = ev.evaluate_sae(lm, sae, reference, progress=False)

    to_sae_lens(sae, tmp_path, hook_name=HOOK, model_name="tiny")
    loaded = sl.SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        ce = model.run_with_saes(tokens, saes=[loaded], return_type="loss").item()
    assert abs(ours.ce_sae - ours.ce_clean) > 1e-3  # the SAE really changes the model's output
    assert ce == pytest.approx(ours.ce_sae, rel=1e-4)
