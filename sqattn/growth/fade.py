"""G_random's fade-in: an LM whose layer ``i`` computes ``x + m_i (block_i(x) - x)`` (= ``y m + x (1 - m)`` in
papers/gstack.md), with ``m`` a parameter the optimizer never moves and a host hook ramps.

* ``FadeLM``: ``sqattn.models.lm.LM`` plus ``fade [num_layers]`` (ones at construction). Registered as model
  ``"fade_lm"``; its parameter tree is the LM's plus ``fade``, so ``strip_fade`` turns a finished run into a
  plain ``lm`` (all masks 1).
* ``FadeLMTask``: the LM task plus ``make_hooks``: a ``FadeHook`` that, after every step ``s``, sets the
  faded layers' masks to ``min(1, s / init.args.fade_steps)``. Which layers are faded is fixed at growth
  (``sqattn.growth.grow`` writes 0 there) and kept in the hook's state, so a resumed run continues the ramp.
  The config must freeze ``fade`` (``optim.trainable = growth.NOT_FADE``): it then gets zero updates and no
  optimizer state, and the ramp is the only thing that changes it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.models.lm import LM
from sqattn.train.tasks import LMTask

FADE = "fade"
NOT_FADE = r"^(?!fade$)"   # optim.trainable regex: every parameter but the mask


class FadeLM(LM):
    """``LM`` whose residual blocks are blended with their input by a per-layer mask ``fade``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fade = nnx.Param(jnp.ones((len(self.pattern),), jnp.float32), axes=(None,))

    def hidden_states(self, x, *, segment_ids=None, positions=None):
        from sqattn.parallel.sharding import constrain
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        out = []
        for i, block in enumerate(self.blocks):
            if self.remat:
                y = nnx.remat(lambda blk, h: blk(h, segment_ids, positions))(block, x)
            else:
                y = block(x, segment_ids, positions)
            m = self.fade[i].astype(y.dtype)
            x = x + m * (y - x)
            out.append(x)
        return out

    def step(self, token_t, cache):
        x = self.embed(token_t)
        new_cache = []
        for i, (blk, c) in enumerate(zip(self.blocks, cache)):
            y, c = blk.step(x, c)
            x = x + self.fade[i].astype(y.dtype) * (y - x)
            new_cache.append(c)
        return self._logits(self.final_norm(x)), new_cache


def ramp(step: int, steps: int) -> float:
    """The mask value after ``step`` optimizer steps of a ramp of ``steps`` (linear, then 1)."""
    return 1.0 if steps <= 0 else float(min(1.0, step / steps))


class FadeHook:
    """Ramps the masks of the layers that were 0 when the run started (read from the first state it sees)."""

    def __init__(self, steps: int, every: int = 1):
        self.every, self.steps = int(every), int(steps)
        self.faded: list[int] | None = None
        self.events: list[dict] = []

    def __call__(self, step, state, ctx):
        fade = np.asarray(state["params"][FADE])
        if self.faded is None:
            # The first call comes after step 1 of a fresh run: the faded layers are the ones below 1 still.
            self.faded = [int(i) for i in np.flatnonzero(fade < 1.0)]
            self.events.append({"event": "fade_layers", "layers": self.faded, "steps": self.steps})
        m = ramp(int(step), self.steps)
        new = fade.copy()
        new[self.faded] = m
        if np.array_equal(new, fade):
            return None
        params = dict(state["params"])
        params[FADE] = jnp.asarray(new, fade.dtype)
        if m == 1.0:
            self.events.append({"event": "fade_done"})
        return dict(state, params=params)

    def state_dict(self) -> dict:
        return {"faded": self.faded, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.faded = None if d.get("faded") is None else [int(i) for i in d["faded"]]


class FadeLMTask(LMTask):
    """``LMTask`` with the fade-in hook of G_random (``init.args.fade_steps``)."""

    def make_hooks(self, config) -> list:
        steps = int((config.init.get("args") or {}).get("fade_steps", 0))
        return [FadeHook(steps)]


def strip_fade(model: FadeLM, config):
    """A plain ``lm`` model (and config) with ``model``'s weights; the masks must all be 1."""
    from sqattn.growth import paths
    from sqattn.train import state as state_lib
    fade = np.asarray(model.fade[...])
    if not np.all(fade == 1.0):
        raise ValueError(f"strip_fade: masks not all 1 yet ({fade.tolist()}); train past init.args.fade_steps")
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.model_name = "lm"
    params = paths.pure_params(model)
    params.pop(FADE)
    return paths.load(state_lib.build_base_model(cfg), params), cfg
