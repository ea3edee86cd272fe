"""Feature absorption (SAEBench's eval, analysis/absorption.py) on cases whose answer is known by hand."""
import math
from pathlib import Path

import pytest
import torch

from switch_sae_core.analysis import absorption as ab
from switch_sae_core.config import SAEConfig
from switch_sae_core.data import first_letter as fl
from switch_sae_core.saes.base import build_sae


def unit(*pairs, D=8):
    v = torch.zeros(D)
    for i, a in pairs:
        v[i] = a
    return v / v.norm()


# --- one letter, words computed by hand -------------------------------------------------------------

def hand_case():
    """Probe = e0. Latent 0: the main latent (e0). Latent 1: (e0 + e1)/sqrt2 (cos 0.707). Latent 2: cos 0.05
    with the probe (too weak for the fraction, enough for full absorption). Latent 3: orthogonal."""
    D = 8
    dec = torch.stack([unit((0, 1)), unit((0, 1), (1, 1)), unit((0, 0.05), (2, math.sqrt(1 - 0.0025))), unit((3, 1))])
    r2 = math.sqrt(2)
    words = [  # (x, coefficients), expected (fraction, full)
        (2 * unit((0, 1)), [2, 0, 0, 0], (0.0, False)),  # the main latent carries it all
        (2 * unit((0, 1)) + 2 * unit((1, 1)), [0, 2 * r2, 0, 0], (1.0, True)),  # fully absorbed by latent 1
        (2 * unit((0, 1)) + unit((1, 1)), [1, r2, 0, 0], (0.5, False)),  # half absorbed (main fires: not full)
        (2 * unit((0, 1)), [0, 0.5 * r2, 0, 0], (0.0, False)),  # absorber carries 0.5 of 2 < 0.4 share
        (unit((0, 1)), [0, 0, 20, 0], (0.0, True)),  # cos 0.05: no fraction (< 0.1), full (>= 0.025)
        (-unit((0, 1)), [0, 0, 0, 1], (0.0, False)),  # probe not activated
    ]
    x = torch.stack([w[0] for w in words])
    coefs = torch.tensor([w[1] for w in words], dtype=torch.float32)
    frac = torch.tensor([w[2][0] for w in words])
    full = torch.tensor([w[2][1] for w in words])
    return x, coefs, dec, unit((0, 1), D=D), frac, full


def test_word_absorption_matches_hand_computation():
    x, coefs, dec, p, frac, full = hand_case()
    w = ab.word_absorption(x, coefs, dec, p, main_ids=[0])
    torch.testing.assert_close(w.absorption_fraction_W, frac)
    assert w.full_W.tolist() == full.tolist()


def test_word_absorption_invariances():
    """Scaling the probe (it is normalised), or x and the coefficients together, changes nothing; the fraction
    stays in [0, 1]; full absorption needs every main latent silent."""
    x, coefs, dec, p, frac, full = hand_case()
    w = ab.word_absorption(3.7 * x, 3.7 * coefs, dec, 5 * p, main_ids=[0])
    torch.testing.assert_close(w.absorption_fraction_W, frac)
    assert w.full_W.tolist() == full.tolist()
    g = torch.Generator().manual_seed(0)
    xr, cr = torch.randn(200, 8, generator=g), torch.randn(200, 4, generator=g).relu()
    w = ab.word_absorption(xr, cr, dec, p, main_ids=[0, 3])
    assert ((w.absorption_fraction_W >= 0) & (w.absorption_fraction_W <= 1)).all()
    assert (cr[w.full_W][:, [0, 3]] < ab.ACTIVE_EPS).all()


def test_main_latents_in_the_split_set_are_not_absorbers():
    """Latent 1 counted as a main latent (feature splitting) is no longer absorption."""
    x, coefs, dec, p, _, _ = hand_case()
    w = ab.word_absorption(x[1:2], coefs[1:2], dec, p, main_ids=[0, 1])
    assert w.absorption_fraction_W.item() == 0.0 and not w.full_W.item()


def test_split_size_stops_at_the_first_k_without_a_jump():
    assert ab.split_size([0.5, 0.52, 0.9]) == 1  # +0.02 is no jump: stop there, the later 0.9 is never seen
    assert ab.split_size([0.5, 0.6, 0.61, 0.9]) == 2
    assert ab.split_size([0.0, 0.0]) == 1


# --- the whole procedure on a synthetic model and a hand-built TopK SAE ------------------------------

def synthetic_words(n_per_letter=40, n_a=200, n_tokens=20, seed=0):
    """x = 2 e_letter (+ small noise). Of the n_a words of letter 'a', 2 n_tokens also carry a token-specific
    direction u_j, each u_j in two consecutive words (one train and one test word of an alternating split);
    the SAE's latent for that token, (e0 + u_j)/sqrt2, wins the TopK (k = 1) over the 'a' latent e0: full
    absorption on exactly those words (Chanin et al.'s mechanism)."""
    g = torch.Generator().manual_seed(seed)
    D = 26 + n_tokens
    letters = torch.cat([torch.zeros(n_a, dtype=torch.long)] + [torch.full((n_per_letter,), l) for l in range(1, 26)])
    x = 2 * torch.nn.functional.one_hot(letters, D).float() + 0.01 * torch.randn(len(letters), D, generator=g)
    absorbed = torch.zeros(len(letters), dtype=torch.bool)
    pairs = torch.randperm(n_a // 2, generator=g)[:n_tokens]
    for j, m in enumerate(pairs.tolist()):
        x[[2 * m, 2 * m + 1], 26 + j] += 2
        absorbed[[2 * m, 2 * m + 1]] = True
    dec = torch.cat([torch.eye(D)[:26], torch.stack([unit((0, 1), (26 + j, 1), D=D) for j in range(n_tokens)])])
    sae = build_sae(SAEConfig(arch="topk", d_in=D, n_features=dec.shape[0], k=1))
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(dec)
        sae.b_pre.zero_()
    return sae, x, letters, absorbed


def test_evaluate_sae_finds_the_constructed_absorption():
    """Train/test split by alternating words: 'a' has 100 test words, 20 of them absorbed: its mean
    absorption fraction and full-absorption rate are 20/100, every other letter's 0, the main latent of
    'a' is latent 0 alone (each token latent adds one test word: an F1 gain below 0.03)."""
    sae, x, letters, absorbed = synthetic_words()
    train = torch.arange(len(letters)) % 2 == 0
    probe = ab.train_letter_probe(x[train], letters[train])
    out = ab.evaluate_sae(sae, probe, x[train], letters[train], x[~train], letters[~train])
    a = out["per_letter"]["a"]
    assert a["main_latents"] == [0]
    expected = absorbed[~train & (letters == 0)].float().mean().item()
    assert a["n_probe_true_positives"] == 100
    assert a["mean_absorption_fraction"] == pytest.approx(expected) and a["full_absorption_rate"] == pytest.approx(expected)
    assert out["scored"] and out["n_letters"] == 26
    assert all(v["mean_absorption_fraction"] == 0 for k, v in out["per_letter"].items() if k != "a")
    assert out["mean_absorption_fraction"] == pytest.approx(expected / 26)
    assert out["mean_full_absorption"] == pytest.approx(expected / 26)


def test_too_few_letters_is_not_scored():
    sae, x, letters, _ = synthetic_words()
    keep = letters < 5
    train = torch.arange(int(keep.sum())) % 2 == 0
    xs, ls = x[keep], letters[keep]
    probe = ab.train_letter_probe(xs[train], ls[train])
    out = ab.evaluate_sae(sae, probe, xs[train], ls[train], xs[~train], ls[~train])
    assert not out["scored"] and out["n_letters"] == 5 and math.isnan(out["mean_absorption_fraction"])


# --- the probe and the latents ------------------------------------------------------------------------

def test_probe_reads_linear_letters_and_shuffled_labels_do_not():
    _, x, letters, _ = synthetic_words()
    train = torch.arange(len(letters)) % 2 == 0
    rep = ab.probe_report(ab.train_letter_probe(x[train], letters[train]), x[~train], letters[~train])
    assert rep["accuracy"] == 1.0 and rep["mean_f1"] == 1.0 and rep["n_letters_f1_above_min"] == 26
    shuffled = letters[train][torch.randperm(int(train.sum()), generator=torch.Generator().manual_seed(1))]
    ctrl = ab.probe_report(ab.train_letter_probe(x[train], shuffled), x[~train], letters[~train])
    assert ctrl["accuracy"] < 0.3 and ctrl["mean_f1"] < 0.3
    assert rep["per_letter"]["a"]["chance_f1"] == pytest.approx(100 / 600)


@pytest.mark.parametrize("kw", [dict(n_experts=4), dict(n_experts=4, top_e=2, shared_expert=True),
                                dict(n_experts=4, scale_by_router_prob=False)])
def test_switch_coefficients_reconstruct_x_hat(kw):
    """Coefficients = the latents' weights in x_hat (router gate included): x_hat - coefs @ decoder is the same
    bias for every input. The raw pre-gate activations fail the same check when the gate is on."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="switch", d_in=16, n_features=64, k=3, **kw))
    with torch.no_grad():
        sae.b_pre.normal_()
    x = torch.randn(50, 16)
    coefs = ab.latent_coefficients(sae, x, batch_size=17)
    assert coefs.shape == (50, sae.decoder_directions().shape[0])
    assert ab.check_coefficients(sae, x, coefs) < 1e-5
    out = sae(x)
    raw = torch.zeros_like(coefs).scatter_add_(1, out.latent_indices, out.latent_acts.detach())
    if kw.get("scale_by_router_prob", True):
        with pytest.raises(ab.AbsorptionError, match="do not reconstruct"):
            ab.check_coefficients(sae, x, raw)


def test_l1_probe_is_seeded_and_leaves_the_global_rng_alone():
    _, x, letters, _ = synthetic_words()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    w1 = ab.l1_probe_weights(x.relu(), letters, seed=3)
    after = torch.rand(1)
    w2 = ab.l1_probe_weights(x.relu(), letters, seed=3)
    assert torch.equal(before, after) and torch.equal(w1, w2)
    assert w1.shape == (26, x.shape[1])
    assert (w1.argmax(1) == torch.arange(26)).all()  # each letter's own latent ranks first


# --- the dataset's text side (no model) ----------------------------------------------------------------

class WordTokenizer:
    """Whitespace-ish toy tokenizer: each vocabulary entry is one token."""

    special_ids = frozenset({0})
    bos_token_id = 0

    def __init__(self, vocab):
        self.vocab = ["<bos>"] + vocab
        self.vocab_size = len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text):
        ids, rest = [], text
        while rest:  # longest match first
            i = max((i for i, t in enumerate(self.vocab) if i and rest.startswith(t)), key=lambda i: len(self.vocab[i]))
            ids.append(i)
            rest = rest[len(self.vocab[i]):]
        return ids


def test_alpha_vocab_prompts_and_word_position():
    tok = WordTokenizer([" cat", "dog", " Émile", "x1", " ", "\n", " has", " the", " first", " letter", ":", " C",
                         " D", " B", " bird", "  two", "Bee"])
    # one leading space at most, ASCII letters only: not " Émile", "x1", " ", "\n", ":", "  two"
    assert fl.alpha_vocab(tok) == [" B", " C", " D", " bird", " cat", " first", " has", " letter", " the", "Bee", "dog"]
    assert fl.first_letter(" Bird") == 1
    p = fl.icl_prompt(" cat", ["dog", " bird"])
    assert p == "\ndog has the first letter: D\n bird has the first letter: B\n cat has the first letter:"
    ids, pos = fl.word_positions(tok, [p], prepend_bos=True)
    assert tok.vocab[ids[0][pos[0]]] == " cat" and len(ids[0]) - pos[0] == 6  # SAEBench's position -6
    distinct = [a + b for a in "abcd" for b in "xyzw"]  # 16 distinct words
    words, train, prompts = fl.make_prompts(distinct, seed=0, n_icl=2)
    assert sorted(words) == sorted(distinct) and sum(train) == int(16 * fl.TRAIN_FRACTION)
    split_of = dict(zip(words, train))
    for w, is_train, pr in zip(words, train, prompts):
        assert pr.endswith("\n" + w + " has the first letter:") and pr.count("\n") == 3
        examples = [line.split(" has")[0] for line in pr.split("\n")[1:-1]]
        assert w not in examples and all(split_of[e] == is_train for e in examples)  # own split only


# --- the script: one record per SAE, resumable ----------------------------------------------------------

def test_score_script_appends_one_record_per_sae_and_skips_scored_ones(tmp_path, monkeypatch):
    import importlib.util

    from switch_sae_core.results import load_records

    spec = importlib.util.spec_from_file_location("absorption_script", Path(__file__).parents[1] / "scripts" / "absorption.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sae, x, letters, absorbed = synthetic_words()
    train = torch.arange(len(letters)) % 2 == 0
    data = fl.FirstLetterData([f"w{i}" for i in range(len(letters))], letters, train,
                              {script.hook(L): x for L in script.DATASET_LAYERS}, {})
    calls = []
    monkeypatch.setattr(script, "load_dataset", lambda args: calls.append(1) or data)
    sae.save(tmp_path / "sae")
    out = tmp_path / "records.jsonl"
    argv = ["score", str(tmp_path / "sae"), "--label", "hand-built", "--seed", "7", "--out", str(out),
            "--records", str(tmp_path / "none.jsonl")]
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path))  # a committed table holds no path of this machine
    monkeypatch.setattr(script.sys, "argv", ["scripts/absorption.py", *argv])
    script.main(argv)
    script.main(argv)  # already scored: no second record, the dataset is not even loaded
    recs = load_records(out)
    assert len(recs) == 1 and len(calls) == 1
    r = recs[0]
    assert (r["label"], r["seed"], r["arch"], r["n_letters"]) == ("hand-built", 7, "topk", 26)
    assert r["sae_dir"] == "$SWITCH_SAE_CACHE/sae" and str(tmp_path) not in r["command"]
    assert r["command"].startswith("python scripts/absorption.py score $SWITCH_SAE_CACHE/sae --label hand-built")
    assert r["mean_full_absorption"] == pytest.approx(absorbed[~train & (letters == 0)].float().mean().item() / 26)
    with pytest.raises(SystemExit, match="not an SAE folder"):
        script.main(["score", str(tmp_path), "--out", str(out)])
