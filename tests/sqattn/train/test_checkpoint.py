"""checkpoint.has_checkpoint: what counts as a checkpoint in a workdir."""

from sqattn.train.checkpoint import has_checkpoint


def test_has_checkpoint(tmp_path):
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints" / "12").mkdir()
    assert has_checkpoint(str(tmp_path))
