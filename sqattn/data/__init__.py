"""Data pipelines: sources by name, each a deterministic, step-indexed grain ``MapDataset``.

Usage::

    cfg = data.default_config("mqar")       # a commented ConfigDict (name, seq_len, seed, ...)
    ds = data.make_dataset(cfg, batch_size=32, split="train", shard_index=0, shard_count=1)
    batch = ds.batch(step)                   # {"inputs", "targets", "weights"}, pure in step

Sources: "text" (local text as bytes), "tfds" (prepared TFDS text dataset as bytes), "mqar",
"copy", "selective_copy", "recall" (synthetic tasks). The checkpointable data position is the step number.
"""

from sqattn.data.base import SPLITS
from sqattn.data.base import Dataset
from sqattn.data.base import default_config
from sqattn.data.base import make_dataset
from sqattn.data.base import source_names
from sqattn.data.text import bits_per_byte

__all__ = ["SPLITS", "Dataset", "bits_per_byte", "default_config", "make_dataset", "source_names"]
