"""Nested byte shards of the text corpus (sqattn.analysis.text_shards)."""

import numpy as np
import pytest

from sqattn import configs, data
from sqattn.analysis import text_shards


def test_shards_are_nested_rows_come_from_the_shard_and_eval_is_the_text_sources():
    small = configs.get("lm_shards:train_bytes=65536,runlocal")
    big = configs.get("lm_shards:train_bytes=262144,runlocal")
    _, cs = text_shards.shard_chunks(small.data)
    train, cb = text_shards.shard_chunks(big.data)
    assert len(cs) == 16 and len(cb) == 64 and list(cb[:16]) == list(cs)
    task = text_shards.ShardedTextTask()
    tr, ev = task.make_datasets(small)
    b = tr.batch(3)
    assert b["inputs"].shape == (small.batch_size, small.data.seq_len)
    allowed = {bytes(train[c * 4096:(c + 1) * 4096]) for c in cs}
    for row in b["inputs"]:
        assert any(bytes(row.astype(np.uint8)) in chunk for chunk in allowed)
    np.testing.assert_array_equal(tr.batch(3)["inputs"], b["inputs"])           # pure in step
    text_cfg = data.default_config("text")
    text_cfg.seq_len = small.data.seq_len
    ref = data.make_dataset(text_cfg, batch_size=small.batch_size, split="eval")
    np.testing.assert_array_equal(ev.batch(0)["inputs"], ref.batch(0)["inputs"])
    assert task.eval_metrics({"ce": 2.0, "accuracy": 1.0, "weight": 2.0})["eval_bits_per_byte"] == \
        pytest.approx(1 / np.log(2))
    with pytest.raises(ValueError, match="train_bytes"):
        text_shards.shard_chunks(configs.get("lm_shards:train_bytes=100").data)
