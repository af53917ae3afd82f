"""CTR data: the synthetic generator, the Criteo/Avazu-format reader, vocabularies and the trainer's split view."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sqattn.data import ctr


def _synth(tmp_path, **kw):
    c = ctr.default_config()
    c.data_dir = str(tmp_path)
    c.num_rows, c.num_fields, c.vocab_max = 6000, 8, 30
    c.high_max_order = 6
    for k, v in kw.items():
        c[k] = v
    return c


def test_synthetic_is_deterministic_saved_once_and_reused(tmp_path):
    c = _synth(tmp_path)
    a = ctr.load_splits(c)
    d = ctr.synthetic_dir(c)
    stamp = os.stat(os.path.join(d, "train.npz")).st_mtime_ns
    b = ctr.load_splits(c)
    assert os.stat(os.path.join(d, "train.npz")).st_mtime_ns == stamp        # reused, not rewritten
    for s in ctr.SPLITS:
        np.testing.assert_array_equal(a[s]["ids"], b[s]["ids"])
    assert [len(a[s]["label"]) for s in ctr.SPLITS] == [4800, 600, 600]
    ids = np.concatenate([a[s]["ids"] for s in ctr.SPLITS])
    assert ids.min() >= 0 and np.all(ids.max(axis=0) < np.asarray(ctr.synthetic_vocab_sizes(c)))
    # regenerating from nothing gives the same rows
    ids2, labels2, _ = ctr.generate_synthetic(c)
    assert ids2.shape == (6000, 8) and labels2.sum() == sum(a[s]["label"].sum() for s in ctr.SPLITS)


def test_synthetic_variants_control_the_high_order_share(tmp_path):
    low = ctr.generate_synthetic(_synth(tmp_path, variant="low"))
    high = ctr.generate_synthetic(_synth(tmp_path, variant="high"))
    np.testing.assert_array_equal(low[0], high[0])                             # same ids
    assert low[2]["alpha"] == 0 and low[2]["high_share"] == 0
    assert high[2]["alpha"] > 0 and abs(high[2]["high_share"] - 0.4) < 0.02
    for _, labels, info in (low, high):
        assert abs(labels.mean() - 0.175) < 0.03 and abs(info["ctr"] - labels.mean()) < 1e-6
    with pytest.raises(ValueError, match="variant must be 'low' or 'high'"):
        ctr.generate_synthetic(_synth(tmp_path, variant="mid"))


def test_bucketize_matches_fuxictr():
    assert [ctr.bucketize(v) for v in (-1, 0, 1, 2, 3, 10, 1000)] == [-1, 0, 1, 2, 1, 5, 47]


def test_vocabulary_is_deterministic_and_maps_unseen_to_oov():
    rows = [["a", "x"], ["b", "x"], ["a", "y"], ["c", "y"], ["b", "x"], ["a", "z"]]
    v1 = ctr.build_vocabulary(rows, 2, min_count=2)
    v2 = ctr.build_vocabulary(rows[::-1], 2, min_count=2)
    assert v1 == v2 == [["a", "b"], ["x", "y"]]                # by count, then value; "c", "z" too rare
    ids = ctr.encode([["a", "y"], ["c", "x"], ["new", "z"]], v1)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 1], [0, 0]])   # rare and unseen -> 0 (OOV)


@pytest.mark.parametrize("source", ["criteo", "avazu"])
def test_file_reader_builds_vocabulary_once_beside_the_data(tmp_path, source):
    path = str(tmp_path / f"{source}.txt")
    ctr.write_sample_file(path, source, 300, seed=1)
    c = ctr.default_config()
    c.source, c.path, c.min_count = source, path, 2
    sizes = ctr.vocab_sizes(c)
    assert len(sizes) == (39 if source == "criteo" else 24)
    files = sorted(os.listdir(ctr.cache_dir(path)))
    assert any(f.startswith("vocab-") for f in files)
    vocab_file = [f for f in files if f.startswith("vocab-")][0]
    stamp = os.stat(os.path.join(ctr.cache_dir(path), vocab_file)).st_mtime_ns
    splits = ctr.load_splits(c)
    assert ctr.vocab_sizes(c) == sizes                            # reused, not rebuilt
    assert os.stat(os.path.join(ctr.cache_dir(path), vocab_file)).st_mtime_ns == stamp
    assert [len(splits[s]["label"]) for s in ctr.SPLITS] == [240, 30, 30]
    for s in ctr.SPLITS:
        assert np.all(splits[s]["ids"] < np.asarray(sizes)) and splits[s]["ids"].min() >= 0
    assert set(np.unique(splits["train"]["label"])) <= {0.0, 1.0}


@pytest.mark.parametrize("content,message", [
    ("", "has no data rows"),
    ("1\t2\t3\n", r"bad\.txt:1: expected 40 criteo columns, found 3 \(missing column\)"),
    ("yes" + "\t1" * 13 + "\tab" * 26 + "\n", r"bad\.txt:1: label 'yes' is not 0 or 1"),
    ("0" + "\t1" * 13 + "\tab" * 26 + "\n" + "1" + "\tx" + "\t1" * 12 + "\tab" * 26 + "\n",
     r"bad\.txt:2: column 1 \(I1\) value 'x' is not a number"),
])
def test_malformed_criteo_file_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ctr.CTRDataError, match=message):
        ctr.read_file(str(path), ctr.CRITEO)


def test_malformed_avazu_header_and_empty_file(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("")
    with pytest.raises(ctr.CTRDataError, match=r"a\.csv: the file is empty"):
        ctr.read_file(str(p), ctr.AVAZU)
    p.write_text("id,label\n1,0\n")
    with pytest.raises(ctr.CTRDataError, match=r"a\.csv:1: header"):
        ctr.read_file(str(p), ctr.AVAZU)


def test_train_split_batches_are_pure_and_shard_the_global_batch():
    arrays = {"ids": np.arange(100, dtype=np.int32).reshape(50, 2), "label": np.arange(50, dtype=np.float32)}
    whole = ctr.CTRSplit(arrays, global_batch_size=8, shuffle=True, seed=3)
    assert whole.num_batches == 6
    shards = [ctr.CTRSplit(arrays, global_batch_size=8, shard_index=i, shard_count=2, shuffle=True, seed=3)
              for i in range(2)]
    for step in (0, 5, 6, 13):
        b = whole.batch(step)
        np.testing.assert_array_equal(np.concatenate([s.batch(step)["label"] for s in shards]), b["label"])
        np.testing.assert_array_equal(b["ids"][:, 0] // 2, b["label"])          # rows stay whole
    epoch = np.concatenate([whole.batch(s)["label"] for s in range(6)])
    assert len(set(epoch.tolist())) == 48                                       # one epoch: no repeats
    assert not np.array_equal(whole.batch(0)["label"], whole.batch(6)["label"])  # reshuffled per epoch


def test_eval_split_covers_every_row_once_with_padding():
    arrays = {"ids": np.arange(22, dtype=np.int32).reshape(11, 2), "label": np.ones(11, np.float32)}
    ev = ctr.CTRSplit(arrays, global_batch_size=4, shuffle=False)
    assert ev.num_batches == 3
    batches = [ev.batch(i) for i in range(3)]
    w = np.concatenate([b["row_weight"] for b in batches])
    assert w.tolist() == [1] * 11 + [0]
    ids = np.concatenate([b["ids"] for b in batches])[:11]
    np.testing.assert_array_equal(ids, arrays["ids"])
    assert ev.batch(3)["row_weight"].sum() == 0                                # past the end: all padding
