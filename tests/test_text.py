"""Corpora and contexts (data/text.py)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from switch_sae_core.data import text
from switch_sae_core.data.tokenizers import ByteTokenizer


def test_offline_corpus_mixes_bible_shakespeare_and_wikipedia_in_a_seeded_order():
    docs = text.offline_documents(seed=0)
    wiki = text.wikipedia_intros()
    assert len(wiki) > 10_000 and wiki[0].startswith("20th-century classical music\n\n20th-century classical")
    assert len(docs) == len(text.bible_chapters()) + len(text.shakespeare_scenes()) + len(wiki)
    assert docs == text.offline_documents(seed=0) and docs != text.offline_documents(seed=1)
    first = docs[:300]
    assert any("LORD" in d for d in first) and any("Enter" in d for d in first)  # all sources early on
    assert sum(d in set(wiki) for d in first) > 100
    assert not any("**" in d or d.startswith("#") for d in docs)  # markdown removed


def test_offline_sources_by_name_and_mixes():
    assert text.offline_source_names("offline") == ["bible", "shakespeare", "wikipedia"]
    assert text.offline_source_names("bible+wikipedia") == ["bible", "wikipedia"]
    assert text.offline_source_names("bible+nonsense") is None
    mix = list(text.documents("wikipedia+bible", seed=3))
    assert sorted(mix) == sorted(text.wikipedia_intros() + text.bible_chapters())
    assert mix == list(text.documents("wikipedia+bible", seed=3))


def test_contexts_are_bos_plus_the_token_stream_in_order():
    tok = ByteTokenizer()
    docs = ["first document", "second one, longer than a context", "third"]
    ctxs = list(text.contexts(docs, tok, context_len=8, prepend_bos=True))
    stream = list(text.token_stream(docs, tok))
    assert all(c.shape == (8,) and c[0] == tok.bos_token_id for c in ctxs)
    assert torch.cat([c[1:] for c in ctxs]).tolist() == stream[: 7 * len(ctxs)]
    assert len(ctxs) == len(stream) // 7  # only the final partial chunk is dropped
    assert stream[len("first document")] == ord("\n")  # no EOS in the byte tokenizer: "\n\n" separates documents
    no_bos = list(text.contexts(docs, tok, context_len=8, prepend_bos=False))
    assert torch.cat(no_bos).tolist() == stream[: 8 * len(no_bos)]


def test_special_mask_marks_bos():
    tok = ByteTokenizer()
    toks = torch.tensor([[256, 65, 66], [67, 256, 68]])
    assert text.special_mask(toks, tok).tolist() == [[True, False, False], [False, True, False]]


def test_local_txt_jsonl_folder_and_saved_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "line one"}) + "\n" + json.dumps({"text": "line two"}) + "\n")
    assert list(text.documents(str(tmp_path / "a.txt"))) == ["plain text file"]
    assert list(text.documents(str(tmp_path / "b.jsonl"))) == ["line one", "line two"]
    assert list(text.documents(str(tmp_path))) == ["plain text file", "line one", "line two"]
    import datasets

    datasets.Dataset.from_dict({"text": ["saved doc 1", "saved doc 2"]}).save_to_disk(str(tmp_path / "saved"))
    assert list(text.documents(str(tmp_path / "saved"))) == ["saved doc 1", "saved doc 2"]


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(text.DataUnavailableError, match="no such file or folder.*'offline'"):
        text.documents("no/such/corpus.txt")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(text.DataUnavailableError, match="has no field 'text'"):
        list(text.documents(str(tmp_path / "c.jsonl")))


def test_openwebtext_offline_is_explained():
    from switch_sae_core.data.lm import hub_reachable

    if hub_reachable():
        pytest.skip("this machine reaches the hub")
    with pytest.raises(text.DataUnavailableError, match="needs internet access; offline use dataset='offline'"):
        next(itertools.islice(text.documents("openwebtext"), 1))
