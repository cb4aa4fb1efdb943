import json

import numpy as np
import pytest
import torch

from moe_arch.config import DataConfig
from moe_arch.data.corpus import Corpus, DataError
from moe_arch.data.dataset import WindowSampler, eval_windows, prepare_data
from moe_arch.data.tokenizer import EOS, train_bpe


def test_embedded_corpus_is_real_text():
    docs = list(Corpus("embedded").documents())
    assert len(docs) > 2000
    text = " ".join(docs[:200])
    assert sum(len(d) for d in docs) > 2_500_000
    assert " the " in text and "hacker" in text.lower()


def test_bpe_training_is_deterministic():
    docs = list(Corpus("embedded").documents())[:300]
    a, b = train_bpe(docs, 600), train_bpe(docs, 600)
    assert a.tok.to_str() == b.tok.to_str()
    assert a.vocab_size == 600 and a.tok.token_to_id(EOS) == a.eos_id
    s = "Hackers write code."
    assert a.decode(a.encode(s)) == s


def test_prepared_data_is_cached_and_split(data_cache):
    cfg = DataConfig(cache_dir=data_cache)
    d1 = prepare_data(cfg, 512)
    d2 = prepare_data(cfg, 512)
    assert d1.cache_dir == d2.cache_dir and d1.meta == d2.meta
    assert d1.meta["split"] == "documents" and d1.meta["val_docs"] > 50
    assert d1.train.dtype == np.uint16 and int(np.asarray(d1.train).max()) < 512
    assert int((np.asarray(d1.train) == d1.tokenizer.eos_id).sum()) == d1.meta["train_docs"]


def test_eval_windows_count_every_token_once():
    tokens = np.arange(1000, dtype=np.uint16)
    pairs = list(eval_windows(tokens, 64))
    targets = torch.cat([t for _, t in pairs])
    assert targets.tolist() == list(range(1, 1000))
    for inp, tgt in pairs:
        assert torch.equal(inp + 1, tgt) and len(inp) <= 64
    capped = torch.cat([t for _, t in eval_windows(tokens, 64, max_tokens=100)])
    assert capped.tolist() == list(range(1, 101))


def test_sampler_is_seeded_resumable_and_shards_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    s1 = WindowSampler(tokens, 32, 2, 8, seed=3)
    s2 = WindowSampler(tokens, 32, 2, 8, seed=3)
    batches = [s1.batch() for _ in range(50)]  # crosses an epoch boundary (312 windows / 8)
    assert s1.epoch == 1
    assert all(torch.equal(a, s2.batch()) for a in batches)
    assert batches[0].shape == (8, 34) and torch.equal(batches[0][:, 1:], batches[0][:, :-1] + 1)
    # Resume from a saved position.
    s3 = WindowSampler(tokens, 32, 2, 8, seed=3)
    s4 = WindowSampler(tokens, 32, 2, 8, seed=3)
    for _ in range(10):
        s3.batch()
    s4.load_state_dict(s3.state_dict())
    assert torch.equal(s3.batch(), s4.batch())
    # Two ranks with half the batch each see exactly the windows one rank sees.
    one = WindowSampler(tokens, 32, 2, 8, seed=5).batch()
    r0, r1 = WindowSampler(tokens, 32, 2, 8, seed=5), WindowSampler(tokens, 32, 2, 8, seed=5)
    assert torch.equal(torch.cat([r0.batch(0, 2), r1.batch(1, 2)]), one)


def test_user_text_and_jsonl_sources(tmp_path, data_cache):
    txt = tmp_path / "book.txt"
    txt.write_text(("It was a bright cold day in April, and the clocks were striking thirteen. " * 400))
    d = prepare_data(DataConfig(source=str(txt), cache_dir=data_cache), 300)
    assert d.meta["split"] == "tail" and d.train.size > d.val.size > 0
    js = tmp_path / "docs.jsonl"
    js.write_text(
        "".join(json.dumps({"body": f"document number {i} about routers and experts."}) + "\n" for i in range(300))
    )
    d = prepare_data(DataConfig(source=str(js), text_field="body", cache_dir=data_cache), 300)
    assert d.meta["split"] == "documents" and d.meta["train_docs"] + d.meta["val_docs"] == 300


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: p / "nope.txt", r"no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"the folder has no"),
        (lambda p: (p / "e.txt").write_text("  \n") and p / "e.txt", r"contains no non-empty documents"),
        (
            lambda p: (p / "b.jsonl").write_text('{"text": "ok"}\n{not json\n') and p / "b.jsonl",
            r"b\.jsonl:2: not valid JSON",
        ),
        (lambda p: (p / "f.jsonl").write_text('{"content": "x"}\n') and p / "f.jsonl", r"no field 'text'.*content"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and p / "bin.txt", r"not UTF-8 text"),
    ],
)
def test_bad_data_is_a_clear_error_never_random_tokens(tmp_path, setup, match):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=match):
        prepare_data(DataConfig(source=str(path), cache_dir=str(tmp_path / "cache")), 300)


def test_tokenizer_errors(tmp_path, data_cache):
    with pytest.raises(
        DataError, match="no such file or folder; give a tokenizer.json, a Hugging Face tokenizer folder"
    ):
        prepare_data(DataConfig(tokenizer=str(tmp_path / "tok.json"), cache_dir=data_cache), 512)
    (tmp_path / "tok.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        prepare_data(DataConfig(tokenizer=str(tmp_path / "tok.json"), cache_dir=data_cache), 512)


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        WindowSampler(np.arange(100, dtype=np.uint16), 32, 1, 8, seed=0)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"data.source='hf:wikitext'.*`datasets` package is not installed"):
        prepare_data(DataConfig(source="hf:wikitext", cache_dir=str(tmp_path)), 512)
