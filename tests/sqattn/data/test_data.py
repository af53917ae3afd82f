"""Tests of sqattn.data: determinism, sharding, the text/tfds readers and the synthetic tasks."""

from __future__ import annotations

import math
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from sqattn import data
from sqattn.data import text
from sqattn.data import tfds_source

SYNTHETIC = ("mqar", "copy", "selective_copy")


def _cfg(name: str, **fields):
    cfg = data.default_config(name)
    for k, v in fields.items():
        cfg[k] = v
    return cfg


def _as_bytes(row: np.ndarray) -> bytes:
    return bytes(np.asarray(row, np.uint8))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small corpus: two text files in a tree, plus a binary file and a hidden file to skip."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz \n", np.uint8)
    (root / "sub").mkdir()
    (root / "a.txt").write_bytes(_as_bytes(rng.choice(letters, 30_000)))
    (root / "sub" / "b.md").write_bytes("héllo wörld\n".encode() + _as_bytes(rng.choice(letters, 20_000)))
    (root / "blob.bin").write_bytes(b"\0\1\2\3" * 100)
    (root / ".hidden.txt").write_bytes(b"hidden text")
    return root


def _text_cfg(path, **fields):
    return _cfg("text", **{"path": str(path), "seq_len": 32, "eval_fraction": 0.1, **fields})


def _small_cfg(name: str, text_root) -> object:
    """Small configs of every local source, for the generic properties."""
    if name == "text":
        return _text_cfg(text_root)
    return {
        "mqar": _cfg("mqar", seq_len=40, num_kv_pairs=6, num_queries=4),
        "copy": _cfg("copy", seq_len=20, copy_len=8, min_copy_len=3),
        "selective_copy": _cfg("selective_copy", seq_len=24, num_tokens=4, num_symbols=8),
    }[name]


# --------------------------------------------------------------------------------------------
# Registry, configs and argument checks.
# --------------------------------------------------------------------------------------------


def test_default_configs_have_common_fields():
    assert set(data.source_names()) == {"text", "tfds", "mqar", "copy", "selective_copy", "recall"}
    for name in data.source_names():
        cfg = data.default_config(name)
        assert cfg.name == name
        assert cfg.seed == 0 and isinstance(cfg.seed, int)
        assert isinstance(cfg.seq_len, int) and cfg.seq_len > 0


def test_unknown_source_lists_names():
    with pytest.raises(ValueError, match=r"unknown data source 'nope'.*text, tfds, mqar, copy"):
        data.default_config("nope")
    cfg = data.default_config("copy")
    cfg.name = "nope"
    with pytest.raises(ValueError, match="selective_copy"):
        data.make_dataset(cfg, batch_size=2, split="train")


def test_bad_arguments():
    cfg = data.default_config("copy")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'eval'\), got 'test'"):
        data.make_dataset(cfg, batch_size=2, split="test")
    with pytest.raises(ValueError, match="multiple of shard_count 4"):
        data.make_dataset(cfg, batch_size=6, split="train", shard_count=4)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        data.make_dataset(cfg, batch_size=4, split="train", shard_index=2, shard_count=2)
    cfg.colour = "blue"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        data.make_dataset(cfg, batch_size=2, split="train")
    ds = data.make_dataset(data.default_config("copy"), batch_size=2, split="train")
    with pytest.raises(ValueError, match="step must be >= 0"):
        ds.batch(-1)


def test_bits_per_byte():
    assert data.bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
    assert data.bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2.0))


# --------------------------------------------------------------------------------------------
# Properties every source shares.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("text",) + SYNTHETIC)
def test_batches_are_deterministic_and_shifted(name, text_dir):
    cfg = _small_cfg(name, text_dir)
    ds = data.make_dataset(cfg, batch_size=4, split="train")
    again = data.make_dataset(cfg, batch_size=4, split="train")  # a "resumed" run
    b3 = ds.batch(3)
    assert set(b3) == {"inputs", "targets", "weights"}
    assert b3["inputs"].dtype == np.int32 and b3["targets"].dtype == np.int32
    assert b3["weights"].dtype == np.float32
    for v in b3.values():
        assert v.shape == (4, cfg.seq_len)
    for k in b3:
        np.testing.assert_array_equal(b3[k], again.batch(3)[k])
    assert not np.array_equal(b3["inputs"], ds.batch(4)["inputs"])
    np.testing.assert_array_equal(b3["inputs"][:, 1:], b3["targets"][:, :-1])
    assert b3["inputs"].min() >= 0 and b3["targets"].max() < ds.vocab_size
    assert set(np.unique(b3["weights"])) <= {0.0, 1.0} and b3["weights"].sum() > 0
    # Another seed gives other data; eval never repeats train.
    other = data.make_dataset(_small_cfg(name, text_dir).copy_and_resolve_references(),
                              batch_size=4, split="train")
    np.testing.assert_array_equal(other.batch(3)["inputs"], b3["inputs"])
    cfg.seed = 1
    reseeded = data.make_dataset(cfg, batch_size=4, split="train")
    assert not np.array_equal(reseeded.batch(3)["inputs"], b3["inputs"])
    ev = data.make_dataset(cfg, batch_size=4, split="eval")
    assert not np.array_equal(ev.batch(3)["inputs"], reseeded.batch(3)["inputs"])


@pytest.mark.parametrize("name,split", [("text", "train"), ("text", "eval"), ("mqar", "train"),
                                        ("copy", "eval"), ("selective_copy", "train")])
def test_shards_partition_the_global_batch(name, split, text_dir):
    cfg = _small_cfg(name, text_dir)
    whole = data.make_dataset(cfg, batch_size=8, split=split)
    shards = [data.make_dataset(cfg, batch_size=8, split=split, shard_index=i, shard_count=4)
              for i in range(4)]
    assert whole.batch_size == 8 and all(s.batch_size == 2 for s in shards)
    for step in (0, 5):
        full = whole.batch(step)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([s.batch(step)[k] for s in shards]),
                                          full[k])


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(name=st.sampled_from(SYNTHETIC), shard_count=st.sampled_from([1, 2, 3, 6]),
                  step=st.integers(0, 10**9))
def test_shards_partition_property(name, shard_count, step):
    cfg = _small_cfg(name, None)
    full = data.make_dataset(cfg, batch_size=6, split="train").batch(step)["inputs"]
    parts = [data.make_dataset(cfg, batch_size=6, split="train", shard_index=i,
                               shard_count=shard_count).batch(step)["inputs"]
             for i in range(shard_count)]
    np.testing.assert_array_equal(np.concatenate(parts), full)


# --------------------------------------------------------------------------------------------
# Text.
# --------------------------------------------------------------------------------------------


def test_default_corpus_is_stdlib_without_tests():
    files = text.stdlib_sources()
    assert len(files) > 100
    names = {os.path.basename(f) for f in files}
    assert {"os.py", "functools.py"} <= names
    for f in files:
        assert f.endswith(".py")
        parts = set(f.split(os.sep))
        assert not parts & text.EXCLUDED_STDLIB_DIRS, f
    corpus = text.load_corpus("")
    assert len(corpus) > 1_000_000
    assert text.load_corpus("") is corpus  # cached
    ds = data.make_dataset(data.default_config("text"), batch_size=2, split="train")
    assert ds.vocab_size == 256 and ds.seq_len == 256
    row = ds.batch(0)
    window = _as_bytes(np.concatenate([row["inputs"][0], row["targets"][0, -1:]]))
    assert corpus.tobytes().find(window) >= 0


def test_text_paths_file_dir_glob(text_dir):
    a, b = str(text_dir / "a.txt"), str(text_dir / "sub" / "b.md")
    assert text.find_files(a) == [a]
    assert text.find_files(str(text_dir)) == [a, b]  # binary and hidden files skipped
    assert text.find_files(str(text_dir / "*.txt")) == [a]
    assert text.find_files(str(text_dir / "**" / "*.md")) == [b]
    assert text.find_files(str(text_dir / "s*")) == [b]  # a matched directory is searched
    corpus = text.load_corpus(str(text_dir))
    expected = (text_dir / "a.txt").read_bytes() + b"\n" + (text_dir / "sub" / "b.md").read_bytes()
    assert corpus.tobytes() == expected


def test_text_train_and_eval_windows(text_dir):
    cfg = _text_cfg(text_dir)
    corpus = text.load_corpus(cfg.path).tobytes()
    n_eval = int(len(corpus) * cfg.eval_fraction)
    train_part, eval_part = corpus[:-n_eval], corpus[-n_eval:]
    train = data.make_dataset(cfg, batch_size=4, split="train")
    for step in (0, 7):
        b = train.batch(step)
        for i in range(4):
            window = _as_bytes(np.concatenate([b["inputs"][i], b["targets"][i, -1:]]))
            assert train_part.find(window) >= 0
        np.testing.assert_array_equal(b["weights"], 1.0)
    ev = data.make_dataset(cfg, batch_size=4, split="eval")
    assert ev.num_batches == (n_eval - 1) // cfg.seq_len // 4
    inputs = np.concatenate([ev.batch(i)["inputs"].reshape(-1) for i in range(ev.num_batches)])
    assert _as_bytes(inputs) == eval_part[:len(inputs)]  # consecutive, non-overlapping windows
    np.testing.assert_array_equal(ev.batch(ev.num_batches)["targets"], ev.batch(0)["targets"])


def test_text_repeated_rows(text_dir):
    """repeat_fraction: a repeated row is one corpus span twice (each second-copy byte equals the byte one span
    back); the eval split holds the fraction exactly, at the rows repeated_rows names; 0 leaves rows unchanged."""
    cfg = _text_cfg(text_dir, repeat_fraction=0.25, seq_len=31)
    span = text.span_length(cfg.seq_len)
    assert span == 16
    corpus = text.load_corpus(cfg.path).tobytes()
    for split in ("train", "eval"):
        ds = data.make_dataset(cfg, batch_size=8, split=split)
        rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in (ds.batch(0), ds.batch(3))]
        rows = np.concatenate(rows)
        repeated = np.all(rows[:, span:] == rows[:, :32 - span], axis=1)
        for r in rows:
            assert corpus.find(_as_bytes(r[:span])) >= 0
        if split == "eval":
            expect = np.concatenate([text.repeated_rows(cfg, 32)[:8], text.repeated_rows(cfg, 32)[24:]])
            np.testing.assert_array_equal(repeated, expect)
            assert text.repeated_rows(cfg, 400).sum() == 100
        else:
            assert 0 < repeated.sum() < len(rows)
    # A row's start does not depend on repeat_fraction: each row is the plain row (repeat_fraction 0) at the same
    # (step, row), or that row's first span twice.
    plain = data.make_dataset(_text_cfg(text_dir, seq_len=31), batch_size=8, split="train").batch(5)
    mixed = data.make_dataset(cfg, batch_size=8, split="train").batch(5)
    for p_in, m_in in zip(plain["inputs"], mixed["inputs"]):
        assert (np.array_equal(m_in, p_in)
                or np.array_equal(m_in, np.concatenate([p_in[:span], p_in[:span]])[:31])), (p_in, m_in)
    assert not np.array_equal(plain["inputs"], mixed["inputs"])
    with pytest.raises(ValueError, match="repeat_fraction must be in"):
        data.make_dataset(_text_cfg(text_dir, repeat_fraction=1.5), batch_size=2, split="train")


def test_text_errors(tmp_path, text_dir):
    missing = str(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        data.make_dataset(_text_cfg(missing), batch_size=2, split="train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no text found for data path '.*empty': searched dir"):
        data.make_dataset(_text_cfg(empty), batch_size=2, split="train")
    with pytest.raises(ValueError, match=r"no text found.*glob '.*\*\.nothing' \(0 match"):
        data.make_dataset(_text_cfg(tmp_path / "*.nothing"), batch_size=2, split="train")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"no text found.*1 file\(s\) looked at"):
        data.make_dataset(_text_cfg(binary), batch_size=2, split="train")
    with pytest.raises(ValueError, match="fewer than one global batch of 4096"):
        data.make_dataset(_text_cfg(text_dir), batch_size=4096, split="eval")
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        data.make_dataset(_text_cfg(text_dir, eval_fraction=1.0), batch_size=2, split="train")


# --------------------------------------------------------------------------------------------
# Synthetic tasks.
# --------------------------------------------------------------------------------------------


def _check_mqar(batch, p: int, q: int, k_vocab: int):
    for inp, tgt, w in zip(batch["inputs"], batch["targets"], batch["weights"]):
        keys, values = inp[0:2 * p:2], inp[1:2 * p:2]
        assert len(set(keys.tolist())) == p and len(set(values.tolist())) == p
        assert keys.min() >= 1 and keys.max() <= k_vocab and values.min() > k_vocab
        bound = dict(zip(keys.tolist(), values.tolist()))
        (pos,) = np.nonzero(w)
        assert len(pos) == q and pos.min() >= 2 * p
        asked = inp[pos].tolist()
        assert len(set(asked)) == q  # distinct queried keys
        for t in pos:
            assert tgt[t] == bound[inp[t]]


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(p=st.integers(1, 12), extra_q=st.integers(0, 11), slack=st.integers(0, 9),
                  noise=st.booleans(), power_a=st.sampled_from([0.01, 1.0]))
def test_mqar_recall_invariant(p, extra_q, slack, noise, power_a):
    q = 1 + extra_q % p
    cfg = _cfg("mqar", num_kv_pairs=p, num_queries=q, seq_len=2 * p + 2 * q + slack,
               key_vocab_size=20, value_vocab_size=15, noise=noise, power_a=power_a)
    ds = data.make_dataset(cfg, batch_size=3, split="train")
    assert ds.vocab_size == 36
    b = ds.batch(2)
    _check_mqar(b, p, q, 20)
    if not noise:  # Outside the kv block and the queries, pad only.
        query_tokens = (b["weights"] > 0) | np.roll(b["weights"] > 0, 1, axis=1)
        rest = b["inputs"][:, 2 * p:][~query_tokens[:, 2 * p:]]
        np.testing.assert_array_equal(rest, 0)


def test_mqar_default_and_query_distance():
    ds = data.make_dataset(data.default_config("mqar"), batch_size=4, split="eval")
    assert ds.vocab_size == 256 and ds.seq_len == 64
    _check_mqar(ds.batch(0), 16, 16, 127)
    # Zoology's power law puts queries nearer the kv block than uniform slots do.
    gaps = {}
    for a in (0.01, 1.0):
        cfg = _cfg("mqar", num_kv_pairs=4, num_queries=4, seq_len=208, power_a=a)
        w = data.make_dataset(cfg, batch_size=64, split="train").batch(0)["weights"]
        gaps[a] = np.nonzero(w)[1].mean() - 8
    assert gaps[0.01] < 0.6 * gaps[1.0]


def test_mqar_that_does_not_fit():
    cfg = _cfg("mqar", num_kv_pairs=16, num_queries=8, seq_len=47)
    with pytest.raises(ValueError, match=r"mqar does not fit: seq_len=47 < 2 \* num_kv_pairs \+ "
                       r"2 \* num_queries = 48"):
        data.make_dataset(cfg, batch_size=2, split="train")
    with pytest.raises(ValueError, match="num_queries <= num_kv_pairs"):
        data.make_dataset(_cfg("mqar", num_kv_pairs=4, num_queries=5), batch_size=2, split="train")
    with pytest.raises(ValueError, match="key_vocab_size"):
        data.make_dataset(_cfg("mqar", key_vocab_size=8), batch_size=2, split="train")


def test_copy_targets_are_the_copied_string():
    cfg = _cfg("copy", seq_len=21, copy_len=10, min_copy_len=2, num_symbols=5)
    ds = data.make_dataset(cfg, batch_size=16, split="train")
    assert ds.vocab_size == 7
    sep = 6
    lengths = set()
    for step in (0, 1):
        b = ds.batch(step)
        for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
            n = int(np.argmax(inp == sep))
            lengths.add(n)
            assert 2 <= n <= 10 and inp[:n].min() >= 1 and inp[:n].max() <= 5
            np.testing.assert_array_equal(np.nonzero(w)[0], np.arange(n, 2 * n))
            np.testing.assert_array_equal(tgt[w > 0], inp[:n])
            np.testing.assert_array_equal(inp[2 * n + 1:], 0)  # padding
    assert len(lengths) > 3  # lengths vary
    fixed = data.make_dataset(_cfg("copy"), batch_size=4, split="train").batch(0)
    np.testing.assert_array_equal(fixed["weights"].sum(axis=1), 16)
    with pytest.raises(ValueError, match=r"copy does not fit: seq_len=31 < 2 \* copy_len = 32"):
        data.make_dataset(_cfg("copy", seq_len=31), batch_size=2, split="train")


def test_selective_copy_targets_are_the_scattered_tokens():
    cfg = _cfg("selective_copy", seq_len=40, num_tokens=6, num_symbols=4)
    ds = data.make_dataset(cfg, batch_size=8, split="train")
    assert ds.vocab_size == 6
    b = ds.batch(5)
    region = 40 - 6
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
        scattered = inp[:region][inp[:region] != 0]
        assert len(scattered) == 6 and inp[region] == 5  # the marker
        np.testing.assert_array_equal(np.nonzero(w)[0], np.arange(region, 40))
        np.testing.assert_array_equal(tgt[w > 0], scattered)
    with pytest.raises(ValueError, match="selective_copy does not fit"):
        data.make_dataset(_cfg("selective_copy", seq_len=20, num_tokens=11), batch_size=2,
                          split="train")


# --------------------------------------------------------------------------------------------
# TFDS (offline: a tiny dataset built here, and the not-prepared error).
# --------------------------------------------------------------------------------------------


def test_tfds_not_prepared_error(tmp_path):
    cfg = _cfg("tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'lm1b' is not prepared under .*never downloads.*"
                       r"`tfds build lm1b --data_dir " + str(tmp_path)):
        data.make_dataset(cfg, batch_size=2, split="train")
    cfg.tfds_name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="'no_such_dataset_xyz' is not a registered TFDS name"):
        data.make_dataset(cfg, batch_size=2, split="eval")


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """Builds a small text dataset in array_record format, offline, from an unregistered builder."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class SqattnTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(0, 60), "test": self._generate_examples(100, 12)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                yield i, {"text": f"sentence {i}: " + "é" * (i % 5) + "x" * (i % 17)}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    SqattnTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_tiny_dataset(tiny_tfds):
    cfg = _cfg("tfds", tfds_name="sqattn_tiny_text", tfds_data_dir=tiny_tfds, seq_len=48,
               eval_split="test")
    train = data.make_dataset(cfg, batch_size=4, split="train")
    assert train.vocab_size == 256
    b = train.batch(2)
    np.testing.assert_array_equal(b["inputs"], data.make_dataset(cfg, batch_size=4,
                                                                 split="train").batch(2)["inputs"])
    assert not np.array_equal(b["inputs"], train.batch(3)["inputs"])
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    source = tfds_source.open_split(cfg, "train")
    stream = b"".join(source[i]["text"] + b"\n" for i in range(len(source)))
    for row in range(4):
        window = _as_bytes(np.concatenate([b["inputs"][row], b["targets"][row, -1:]]))
        assert (stream * 2).find(window) >= 0  # a window of the (wrapping) packed stream
    shards = [data.make_dataset(cfg, batch_size=4, split="train", shard_index=i, shard_count=2)
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([s.batch(2)["inputs"] for s in shards]),
                                  b["inputs"])
    ev = data.make_dataset(cfg, batch_size=2, split="eval")
    test_source = tfds_source.open_split(cfg, "test")
    test_stream = b"".join(test_source[i]["text"] + b"\n" for i in range(len(test_source)))
    seen = np.concatenate([ev.batch(i)["inputs"].reshape(-1) for i in range(6)])  # > 1 pass
    assert _as_bytes(seen) == (test_stream * 3)[:len(seen)]
    cfg.text_key = "body"
    with pytest.raises(KeyError, match="'body' is not a feature"):
        data.make_dataset(cfg, batch_size=2, split="train").batch(0)
