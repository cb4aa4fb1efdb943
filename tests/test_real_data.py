"""Real data: every source kind read by the library that owns its format, streaming preparation into shards
(resumable, capped, bounded memory), tokenizer folders with their own special tokens, and `moe-arch eval`."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_arch.config import Config, DataConfig, load_config
from moe_arch.data.corpus import Corpus, DataError
from moe_arch.data.dataset import prepare_data
from moe_arch.data.tokenizer import TextTokenizer, padded_vocab, train_bpe

pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    f"Document {i}: the router sends token {i % 7} to expert {i % 5}; the norm weight moves by {i} ulp."
    for i in range(240)
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    tok = train_bpe(DOCS * 3, 400)
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(out.parent)
    return out


def _write_sources(root: Path) -> dict[str, str]:
    """The same documents in every format, written by the libraries that own them."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
    src = {}
    pq.write_table(table, root / "d.parquet", row_group_size=50)
    src["parquet"] = str(root / "d.parquet")
    with pa.OSFile(str(root / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=64)
    src["arrow"] = str(root / "d.arrow")
    pcsv.write_csv(table, root / "d.csv")
    src["csv"] = str(root / "d.csv")
    lines = "".join(json.dumps({"body": d}) + "\n" for d in DOCS).encode()
    with gzip.open(root / "d.jsonl.gz", "wb") as f:
        f.write(lines)
    src["jsonl.gz"] = str(root / "d.jsonl.gz")
    with pa.output_stream(str(root / "d.jsonl.zst"), compression="zstd") as f:
        f.write(lines)
    src["jsonl.zst"] = str(root / "d.jsonl.zst")
    parts = root / "parts"
    parts.mkdir()
    for k in range(3):
        pq.write_table(table.slice(k * 80, 80), parts / f"part-{k}.parquet")
    src["glob"] = str(parts / "*.parquet")
    src["folder"] = str(parts)
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(root / "saved"))
    src["saved"] = str(root / "saved")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"body": DOCS}), "test": datasets.Dataset.from_dict({"body": DOCS[:10]})}
    ).save_to_disk(str(root / "saveddict"))
    src["saved dict"] = str(root / "saveddict")
    return src


def test_every_source_kind_yields_the_same_documents(tmp_path):
    src = _write_sources(tmp_path)
    for kind, source in src.items():
        docs = list(Corpus(source, "body").documents())
        assert docs == DOCS, kind
    # A saved DatasetDict: data.split picks the split, a wrong one names the splits there.
    assert list(Corpus(src["saved dict"], "body", split="test").documents()) == DOCS[:10]
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: \['train', 'test'\]\)"):
        list(Corpus(src["saved dict"], "body", split="dev").documents())
    # A missing column names the columns there and the field to set, in every tabular format.
    for kind in ("parquet", "arrow", "csv"):
        with pytest.raises(DataError, match=r"no column 'text' \(columns: \['id', 'body'\]\); set data.text_field"):
            list(Corpus(src[kind], "text").documents())
    with pytest.raises(DataError, match=r"column 'id' holds int"):
        list(Corpus(src["parquet"], "id").documents())
    with pytest.raises(DataError, match="the pattern matches no"):
        Corpus(str(tmp_path / "nothing" / "*.parquet"))
    # The document cap stops the reader.
    assert list(Corpus(src["parquet"], "body", max_documents=7).documents()) == DOCS[:7]


def test_hf_sources_load_dataset_streaming_and_config(tmp_path):
    """`hf:` goes through datasets.load_dataset (streamed or not), here on a local folder of JSONL files."""
    folder = tmp_path / "hub_like"
    (folder / "data").mkdir(parents=True)
    for name, rows in (("train", DOCS), ("test", DOCS[:20])):
        (folder / "data" / f"{name}.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in rows))
    for streaming in (False, True):
        c = Corpus(f"hf:{folder}", "body", streaming=streaming)
        assert list(c.documents()) == DOCS
        assert list(Corpus(f"hf:{folder}:test", "body", streaming=streaming).documents()) == DOCS[:20]
    assert "streaming" in Corpus(f"hf:{folder}", "body", streaming=True).describe()
    # The short form with a config; the structured fields override it.
    c = Corpus("hf:wikitext:wikitext-103-raw-v1:validation")
    assert (c.hf.name, c.hf.config, c.hf.split) == ("wikitext", "wikitext-103-raw-v1", "validation")
    c = Corpus("hf:HuggingFaceFW/fineweb", hf_config="sample-10BT", streaming=True)
    assert (c.hf.config, c.hf.split, c.hf.streaming) == ("sample-10BT", "train", True)
    with pytest.raises(DataError, match=r"could not load the dataset.*data.hf_config and data.split"):
        list(Corpus("hf:surely-not-a-local-dataset-xyz").documents())
    # Preparing from a stream with a token cap.
    d = prepare_data(
        DataConfig(
            source=f"hf:{folder}", text_field="body", streaming=True, max_tokens=2000, cache_dir=str(tmp_path / "c")
        ),
        300,
    )
    assert d.meta["capped"] and 2000 <= d.meta["train_tokens"] + d.meta["val_tokens"] < 2000 + 60


def test_prepared_tokens_equal_a_direct_encoding_across_shards(tmp_path, bpe):
    """Shards are one stream: reading across their boundaries gives the tokens of encoding every document."""
    src = _write_sources(tmp_path)
    tok = TextTokenizer.load(bpe)
    d = prepare_data(
        DataConfig(
            source=src["parquet"],
            text_field="body",
            tokenizer=str(bpe),
            shard_tokens=1024,
            cache_dir=str(tmp_path / "c"),
        ),
        0,
    )
    assert len(d.meta["train_shards"]) > 3
    from moe_arch.data.dataset import _is_val

    want = {"train": [], "val": []}
    for i, doc in enumerate(DOCS):
        want["val" if _is_val(i, 0.05) else "train"].extend(tok.encode(doc) + [tok.eos_id])
    assert np.array_equal(np.asarray(d.train), want["train"]) and np.array_equal(np.asarray(d.val), want["val"])
    # Slices that cross a shard boundary.
    a = np.asarray(want["train"])
    for s in (1000, 1023, 2040, 3070):
        assert np.array_equal(d.train[s : s + 50], a[s : s + 50])
    assert d.train[1024] == a[1024] and d.train[-1] == a[-1]


def test_a_large_text_file_streams_in_pieces_with_one_end_of_document(tmp_path, monkeypatch, bpe):
    from moe_arch.data import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "TEXT_PIECE_CHARS", 1000)  # pieces of a small file, as of a big one
    text = "".join(f"line {i} of a long book about experts and routers.\n" for i in range(400))
    (tmp_path / "book.txt").write_text(text)
    items = list(Corpus(str(tmp_path / "book.txt")).documents())
    assert len(items) > 10 and "".join(items) == text
    assert all(isinstance(p, corpus_mod.Piece) for p in items[:-1]) and not isinstance(items[-1], corpus_mod.Piece)
    d = prepare_data(
        DataConfig(source=str(tmp_path / "book.txt"), tokenizer=str(bpe), cache_dir=str(tmp_path / "c")), 0
    )
    tok = TextTokenizer.load(bpe)
    stream = np.concatenate([np.asarray(d.train), np.asarray(d.val)])
    assert d.meta["split"] == "tail" and int((stream == tok.eos_id).sum()) == 1 and stream[-1] == tok.eos_id
    assert tok.decode(stream[:-1].tolist()) == text


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, bpe):
    from moe_arch.data import dataset as ds_mod

    src = _write_sources(tmp_path)
    monkeypatch.setattr(ds_mod, "BATCH_DOCS", 16)
    cfg = DataConfig(
        source=src["parquet"], text_field="body", tokenizer=str(bpe), shard_tokens=2048, cache_dir=str(tmp_path / "c")
    )
    real = ds_mod._ShardWriter.sync
    calls = {"n": 0}

    def crash_after_some_batches(self):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-build, after a few batches were recorded
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(ds_mod._ShardWriter, "sync", crash_after_some_batches)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, 0, log=lambda *a: None)
    cache = next((tmp_path / "c").iterdir())
    assert not (cache / "meta.json").exists() and (cache / "progress.json").exists()
    done = json.loads((cache / "progress.json").read_text())["items"]
    assert 0 < done < len(DOCS)
    # Garbage a killed writer could leave past the recorded point is cut away.
    with open(cache / "train-00000.bin", "ab") as f:
        f.write(b"\x07\x00" * 99)
    monkeypatch.setattr(ds_mod._ShardWriter, "sync", real)
    logs = []
    resumed = prepare_data(cfg, 0, log=logs.append)
    assert any("resuming the interrupted tokenization" in m and f"after {done:,} items" in m for m in logs)
    fresh = prepare_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c2")}), 0, log=lambda *a: None)
    assert np.array_equal(np.asarray(resumed.train), np.asarray(fresh.train))
    assert np.array_equal(np.asarray(resumed.val), np.asarray(fresh.val))
    assert resumed.meta["train_docs"] == fresh.meta["train_docs"] and not (cache / "progress.json").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        (dict(source="no/such/x.parquet"), "no such file or folder"),
        (dict(max_tokens=-1), "data.max_tokens.*must be >= 0"),
        (dict(hf_config="sample-10BT"), "data.hf_config.*applies to hf: sources only"),
        (dict(source="hf:a:b:c:d"), "expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"),
    ],
)
def test_bad_data_settings_name_the_field(tmp_path, case, match):
    from moe_arch.config import ConfigError

    with pytest.raises((DataError, ConfigError), match=match):
        prepare_data(DataConfig(cache_dir=str(tmp_path), **case), 300)


# ---------------------------------------------------------------------------------------------- tokenizers
def _gpt2_style_folder(root: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        DOCS,
        trainers.BpeTrainer(
            vocab_size=350, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    root.mkdir()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 1024,
            }
        )
    )
    return root


def _llama_style_folder(root: Path) -> Path:
    """SentencePiece-style BPE with byte fallback, <unk>/<s>/</s> first, a post-processor adding <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials + byte_tokens))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    root.mkdir()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": {"content": "</s>", "special": True},
                "unk_token": {"content": "<unk>", "special": True},
            }
        )
    )
    (root / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return root


def test_tokenizer_folders_take_their_special_tokens_from_their_config(tmp_path):
    from transformers import AutoTokenizer

    for folder, bos in (
        (_gpt2_style_folder(tmp_path / "gpt2"), False),
        (_llama_style_folder(tmp_path / "llama"), True),
    ):
        ours = TextTokenizer.load(folder)
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert ours.eos_id == hf.eos_token_id and ours.eos_token == hf.eos_token
        assert ours.add_bos is bos and (not bos or ours.bos_id == hf.bos_token_id)
        # A document in the stream is exactly what AutoTokenizer gives for the text, plus EOS.
        doc = DOCS[3]
        assert ours.encode_documents([doc])[0] == hf(doc)["input_ids"] + [hf.eos_token_id]
        # Bits-per-byte's table: the bytes of the text the document's tokens stand for.
        ids = ours.encode(doc)
        n = int(ours.byte_lengths()[ids].sum())
        assert n == len(doc.encode()) + (1 if bos else 0)  # SentencePiece's prefix space counts as a byte
    # The Llama-style EOS is </s> (id 2), not the first special token (<unk>) an older guess took.
    llama = TextTokenizer.load(tmp_path / "llama")
    assert (llama.eos_token, llama.eos_id, llama.bos_id) == ("</s>", 2, 1)
    # A bare tokenizer.json of an unknown family: an error asking for the config or data.eos_token, no guess.
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "<sep>": 2}, unk_token="[PAD]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(DataError, match=r"no end-of-document token.*set data.eos_token"):
        TextTokenizer.load(tmp_path / "bare.json")
    assert TextTokenizer.load(tmp_path / "bare.json", eos_token="<sep>").eos_id == 2
    # Only the slow files (vocab.json + merges.txt): transformers converts them, offline.
    slow = tmp_path / "gpt2-slow"
    AutoTokenizer.from_pretrained(str(tmp_path / "gpt2")).save_pretrained(str(slow), legacy_format=True)
    (slow / "tokenizer.json").unlink(missing_ok=True)
    if (slow / "vocab.json").exists():
        conv = TextTokenizer.load(slow)
        assert conv.eos_token == "<|endoftext|>" and (
            conv.encode(DOCS[5]) == TextTokenizer.load(tmp_path / "gpt2").encode(DOCS[5])
        )


def test_the_model_vocabulary_follows_a_given_tokenizer(tmp_path, data_cache):
    from moe_arch.config import ConfigError
    from moe_arch.training.trainer import resolve_config

    folder = _llama_style_folder(tmp_path / "llama")
    tok = TextTokenizer.load(folder)
    assert tok.vocab_size == 500 and padded_vocab(500) == 512
    cfg = load_config("tiny", ["--data.tokenizer", str(folder)])
    assert cfg.model.vocab_size == 4096 and resolve_config(cfg, tok).model.vocab_size == 512
    cfg = load_config("tiny", ["--data.tokenizer", str(folder), "--model.vocab_size", "512"])
    assert resolve_config(cfg, tok).model.vocab_size == 512
    cfg = load_config("tiny", ["--data.tokenizer", str(folder), "--model.vocab_size", "4096"])
    with pytest.raises(
        ConfigError,
        match=r"model.vocab_size=4096 was set by hand, but data.tokenizer=.* has 500 "
        r"tokens \(the model needs 512.*set it to 512",
    ):
        resolve_config(cfg, tok)
    # In a YAML file of the user's (starting from a preset) it is set by hand too; in the preset itself it is not.
    (tmp_path / "my.yaml").write_text(f"preset: tiny\nmodel: {{vocab_size: 1000}}\ndata: {{tokenizer: {folder}}}\n")
    with pytest.raises(ConfigError, match="model.vocab_size=1000 was set by hand"):
        resolve_config(load_config(str(tmp_path / "my.yaml")), tok)


# ---------------------------------------------------------------------------------------------- bounded memory
@pytest.mark.slow
def test_preparing_a_corpus_several_times_larger_than_an_rss_cap(tmp_path):
    """Peak RSS while preparing stays under a fixed cap for a corpus 4x that cap (measured in a child process
    from its RSS after start-up, so the interpreter and libraries are not counted). A word-level tokenizer keeps
    the test's tokenizing time short; what is measured is the pipeline (reader, batches, shards)."""
    cap_mb = 32
    corpus = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    words = [
        "expert",
        "router",
        "token",
        "norm",
        "weight",
        "mamba",
        "state",
        "depth",
        "gate",
        "loss",
        "the",
        "a",
        "of",
        "to",
        "and",
        "step",
    ]
    with open(corpus, "w") as f:
        size = 0
        while size < 4 * cap_mb << 20:
            lines = "".join(json.dumps({"text": " ".join(rng.choice(words, 300))}) + "\n" for _ in range(16))
            f.write(lines * 16)
            size += len(lines) * 16
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words + ["<unk>", "<|endoftext|>"])}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    script = f"""
import json
import psutil
from moe_arch.config import DataConfig
from moe_arch.data.dataset import prepare_data
base = psutil.Process().memory_info().rss
d = prepare_data(DataConfig(source={str(corpus)!r}, tokenizer={str(tmp_path / "tok.json")!r}, shard_tokens=1 << 22,
                            cache_dir={str(tmp_path / "cache")!r}), 0, log=lambda *a: None)
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's peak across exec).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"base": base, "peak": peak, "tokens": d.meta["train_tokens"] + d.meta["val_tokens"],
                  "shards": len(d.meta["train_shards"])}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = (r["peak"] - r["base"]) / 2**20
    assert corpus.stat().st_size > 4 * cap_mb << 20 and r["tokens"] > 20_000_000 and r["shards"] > 4
    assert grew < cap_mb, f"{r}: peak RSS grew {grew:.0f} MB while preparing {corpus.stat().st_size >> 20} MB"


# ---------------------------------------------------------------------------------------------- eval
def test_eval_reproduces_the_in_training_validation_loss(small_cfg, tmp_path, capsys):
    from moe_arch import cli
    from moe_arch.training.trainer import Trainer

    cfg = Config.from_dict({**small_cfg.to_dict(), "train": {**small_cfg.to_dict()["train"], "steps": 4}})
    res = Trainer(cfg).run()
    logged = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_loss" in r][-1]
    final = res.last_checkpoint
    capsys.readouterr()
    caches = sorted(Path(cfg.data.cache_dir).iterdir())
    assert cli.main(["eval", str(final), "--max-tokens", str(cfg.train.eval_max_tokens), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(Path(cfg.data.cache_dir).iterdir()) == caches  # the run's train-bpe tokens, not a second copy
    assert out["split"] == "val" and out["tokens"] == val["val_tokens"]
    assert out["loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    # Bits-per-byte: the same summed loss over the bytes of the validation text the targets stand for.
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / out["bytes"])
    import torch

    state = torch.load(final, weights_only=True)
    tok = TextTokenizer.from_checkpoint(state, "ck")
    from moe_arch.data.dataset import prepare_data as prep

    val_tokens = np.asarray(prep(cfg.data, cfg.model.vocab_size, log=lambda *a: None).val)
    targets = [t for t in val_tokens[1 : 1 + out["tokens"]].tolist() if t != tok.eos_id]
    assert out["bytes"] == len(tok.tok.decode(targets).encode("utf-8"))
    # Another source, every token once: a JSONL file of the same kind of text.
    js = tmp_path / "other.jsonl"
    js.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    assert (
        cli.main(
            [
                "eval",
                str(final),
                "--data",
                str(js),
                "--data.text_field",
                "body",
                "--quiet",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    other = json.loads(capsys.readouterr().out)
    n_tokens = sum(len(tok.encode(d)) + 1 for d in DOCS)
    assert other["split"] == "all" and json.loads((tmp_path / "e.json").read_text()) == other
    assert other["tokens"] in (n_tokens - 1, n_tokens - 2)  # each of the two streams' first token is not predicted
    assert cli.main(["eval", str(final), "--model.d_model", "8"]) == 2
    assert "only --data.FIELD overrides apply" in capsys.readouterr().err


def test_training_with_a_downloaded_style_tokenizer_folder(small_cfg, tmp_path, capsys):
    """End to end: a Llama-style folder and a parquet source; the model's vocabulary follows the tokenizer, the
    checkpoint carries the tokenizer and its special tokens, and generation starts the prompt with its BOS."""
    import pyarrow.parquet as pq
    import torch

    from moe_arch import cli
    from moe_arch.training.trainer import Trainer

    folder = _llama_style_folder(tmp_path / "llama")
    pq.write_table(pa.table({"text": DOCS * 4}), tmp_path / "train.parquet")
    d = small_cfg.to_dict()
    d["data"].update(source=str(tmp_path / "train.parquet"), tokenizer=str(folder))
    d["train"]["steps"] = 2
    d["model"]["vocab_size"] = 300  # a preset's value, not set by hand: the tokenizer decides
    res = Trainer(Config.from_dict(d)).run()
    state = torch.load(res.last_checkpoint, weights_only=True)
    assert state["config"]["model"]["vocab_size"] == 512 and state["model"]["embed.weight"].shape[0] == 512
    assert "model.vocab_size 300 -> 512: follows the tokenizer's 500 tokens" in capsys.readouterr().out
    tok = TextTokenizer.from_checkpoint(state, "ck")
    assert (tok.eos_token, tok.bos_token, tok.add_bos) == ("</s>", "<s>", True)
    data = prepare_data(Config.from_dict(d).data, 512, log=lambda *a: None)
    first = np.asarray(data.train[:40]).tolist()
    assert first[0] == tok.bos_id and tok.eos_id in first and first[first.index(tok.eos_id) + 1] == tok.bos_id
    assert cli.main(["generate", str(res.last_checkpoint), "--prompt", "The router", "--max-new-tokens", "3"]) == 0
