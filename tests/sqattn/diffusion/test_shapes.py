"""The shapes world (sqattn/data/shapes.py) and the SPM prompt batches."""

import numpy as np
import pytest

from sqattn.data import shapes
from sqattn.diffusion.tasks import PromptBatches, concept_prompts


def test_batches_are_pure_in_seed_and_step_and_shard():
    full = shapes.ShapesBatches("train", global_batch_size=8, seed=3)
    a, b = full.batch(5), full.batch(5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images"], full.batch(6)["images"])
    half = shapes.ShapesBatches("train", global_batch_size=8, seed=3, shard_index=1, shard_count=2).batch(5)
    assert np.array_equal(half["images"], a["images"][4:])
    assert a["images"].shape == (8, 16, 16, 3) and a["images"].min() >= -1 and a["images"].max() <= 1
    ev = shapes.ShapesBatches("eval", global_batch_size=8, seed=3, eval_period=2)
    assert np.array_equal(ev.batch(0)["images"], ev.batch(2)["images"])
    assert not np.array_equal(ev.batch(0)["images"], a["images"])


def test_render_draws_each_shape_in_its_colour():
    rng = np.random.default_rng(0)
    imgs = shapes.render(np.arange(4), np.array([0, 1, 2, 0]), rng, jitter=False)
    masks = ((imgs + 1) / 2 > 0.3).any(-1)                                  # [4, H, W] silhouettes
    assert np.all(masks.mean(axis=(1, 2)) > 0.05)
    assert all(np.sum(masks[i] != masks[j]) >= 4 for i in range(4) for j in range(i))   # all different
    centre = imgs[:, 8, 8]                                                   # every shape covers the centre
    assert list(centre.argmax(-1)) == [0, 1, 2, 0]


def test_tokens_prompts_and_errors():
    assert shapes.detokenize(shapes.tokenize("a red star")) == "a red star"
    assert shapes.tokenize("").sum() == 0 and shapes.tokenize("a red star").shape == (shapes.TEXT_LEN,)
    with pytest.raises(ValueError, match=r"unknown words \['purple'\]"):
        shapes.tokenize("a purple star")
    assert concept_prompts("star") == ["a red star", "a green star", "a blue star", "a star"]
    assert concept_prompts("blue")[-1] == "a blue"
    with pytest.raises(ValueError, match="neither a shape"):
        concept_prompts("cat")
    b = PromptBatches("star", "", global_batch_size=6, seed=0, split="train").batch(0)
    assert all("star" in shapes.detokenize(t) for t in b["target"]) and b["surrogate"].sum() == 0
