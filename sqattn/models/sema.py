"""SEMA: self-expanding mixture of adapters for continual learning, on ``sqattn.models.vit.ViT``
(papers/sema.md; Wang et al., CVPR 2025, arXiv 2403.18886).

Model ``SEMAViT`` (``model_name="vit_sema"``): a ViT backbone whose block l computes

    x_a = x + Attn(Norm1(x));   x_out = x_a + MLP(Norm2(x_a)) + sum_k w_k f_k(x_a)

with ``SEMALayer`` l holding ``max_adapters`` preallocated modular adapters (``1`` in the non-expandable
blocks; the last ``num_expandable`` blocks expand). Slot k of a layer is

* a functional adapter f_k(x) = up(ReLU(down x + b)) + b_up (bottleneck ``bottleneck``, ``up`` zero-initialised so
  a new adapter leaves the output unchanged; applied token-wise, no extra norm, no scale, as the official code);
* a representation descriptor (RD): a linear autoencoder d -> ``rd_dim`` -> d on the token mean x_bar of x_a
  (CLS included), loss l = mean_d (AE(x_bar) - x_bar)^2 per sample (expandable layers only);
* a router column: logit_k = x_bar . r_k + c_k; w = softmax over the active slots of logit / temperature, one
  weight vector per sample (a single active slot gets weight 1).

``status`` [K, 6] (a float ``Param`` that no optimizer step ever changes: it enters the forward pass through
``stop_gradient`` and the stream's ``optim.trainable`` regexes never match it) holds per slot ACTIVE, TRAIN
(this run trains the slot), CREATED (task index), and the RD's frozen loss statistics MU, SIGMA, COUNT. A slot
with TRAIN = 0 reads its parameters through ``stop_gradient``, so its gradient is exactly zero and, with no
weight decay, Adam leaves it exactly unchanged (old adapters, routers and RDs are frozen); gradients still flow
*through* frozen slots into trainable ones below them.

Static shapes: the slots of a layer are stacked arrays ([K, d, r] etc.); expansion flips status values of a
preallocated slot (ACTIVE, TRAIN, CREATED) and never changes a shape, so every run of a stream has the same
parameter tree and its train/eval steps are the same programs (each run is a new trainer call, which traces
them again; the persistent compilation cache then serves the executable). What recompiles: nothing on
expansion; a different ``optim.trainable`` regex (func / rd / joint phase) is a different optimizer program; a
slot's status values are data, so one compiled step serves any adapter set.

The RD's z-score of a sample is |l - MU| / SIGMA (0 while COUNT <= 2). MU and SIGMA are the mean and standard
deviation of the RD's last ``buffer_size`` training losses: the losses of the last ``buffer_size`` training
examples of its RD-phase run under the final RD weights (the official FIFO records the losses of the forward
passes of training; ours are the same examples, evaluated once after the last update). They are computed when
the RD is frozen, i.e. by the transform that starts the next run, and never change afterwards.

Per-task protocol (``sqattn.train.stream``): each step is one trainer run started from the previous run by an
``init.transform`` of this module:

* ``start`` (task 0): copies a trained ``ViT``'s parameters into the backbone and activates slot 0 of every
  layer with TRAIN = 1 (the default status of a freshly built ``SEMAViT``).
* ``advance`` (every later run; ``config.init.args.phase`` is ``"func"``, ``"rd"`` or ``"joint"``): an rd run
  keeps the source's TRAIN flags (it trains the RDs of the slots the func run trained). A func or joint run first
  freezes the source run's trained slots (recording the RD statistics of an rd or joint source on the source run's
  data), then applies ``config.init.args.method``:
  - ``sema``: detection on the new task's training examples (``detect``): batches of ``detect_batch`` in order,
    bottom-up over the expandable layers; the first layer where ``min_k mean_i z_{k,i} > z_threshold``, that has
    not expanded in this task and has a free slot, gets a new slot (TRAIN = 1). The stream then trains it (func:
    adapter + router column + head; rd: the new RD only; joint: both in one run, see ``sqattn.train.stream``) and
    restarts detection from scratch, until a pass triggers nothing. A task that added nothing trains the head
    only. (The official loop visits the detection batches shuffled and keeps going through the epoch after an
    expansion before restarting; ours visits them in order and restarts at once.)
  - ``expand_every``: a new slot in every expandable layer at the first run of each task (no detection).
  - ``ft_adapter``: one adapter per layer, trained on every task (never frozen).
  - ``prototypes``: no adapter; the head rows of the task's classes become class-mean features (``w_c = p_c``,
    ``b_c = -|p_c|^2 / 2``, so the linear head is the nearest-class-mean classifier) and nothing is trained.

Old-class logits are masked by the task (``sqattn.train.classify_task``): training scores only the current task's
classes, eval all seen classes.

Deviations from the official code (all documented choices): AdamW (weight decay 0) instead of SGD with momentum and
weight decay 5e-4 (the trainer's optimizer; with no decay the masked old-class rows of the head do not shrink,
and the frozen slots stay bit-identical); RMSNorm and SwiGLU in the backbone (sqattn's layers); the RD statistics
as above.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.layers import Dense
from sqattn.layers.core import param
from sqattn.models.vit import ViT

# Columns of SEMALayer.status.
ACTIVE, TRAIN, CREATED, MU, SIGMA, COUNT = range(6)
NUM_STATUS = 6
METHODS = ("sema", "expand_every", "ft_adapter", "prototypes")
PHASES = ("func", "rd", "joint")
_MASK = -1e30

# optim.trainable regexes of the two phases (paths like "sema/3/adapters/1/down").
FUNC_TRAINABLE = r"^head/|^sema/\d+/(adapters|router)/"
RD_TRAINABLE = r"^sema/\d+/rds/"
JOINT_TRAINABLE = r"^head/|^sema/\d+/(adapters|router|rds)/"
# prototypes train nothing: the one matched leaf enters the forward pass through stop_gradient (zero update)
NOTHING_TRAINABLE = r"^sema/0/status$"


def trainable_regex(method: str, phase: str) -> str:
    """``optim.trainable`` of a stream run."""
    if method == "prototypes":
        return NOTHING_TRAINABLE
    return {"func": FUNC_TRAINABLE, "rd": RD_TRAINABLE, "joint": JOINT_TRAINABLE}[phase]


def _gated(v: jax.Array, flag: jax.Array) -> jax.Array:
    """``v`` whose gradient is multiplied by ``flag`` (0 or 1): flag * v + (1 - flag) * stop_gradient(v)."""
    return flag * v + (1.0 - flag) * jax.lax.stop_gradient(v)


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapters(nnx.Module):
    """K functional adapters f_k(x) = up_k(ReLU(down_k x + b_k)) + c_k, stacked; every ``up_k`` starts at zero.

    ``down`` takes a torch ``Linear(d, r)``'s kaiming_uniform(a=sqrt(5)) init, U(-1/sqrt(d), 1/sqrt(d)).
    """

    def __init__(self, k: int, d: int, r: int, *, rngs: nnx.Rngs):
        self.down = param(rngs, _uniform(1.0 / math.sqrt(d)), (k, d, r), (None, "embed", None))
        self.down_bias = nnx.Param(jnp.zeros((k, r), jnp.float32), axes=(None, None))
        self.up = nnx.Param(jnp.zeros((k, r, d), jnp.float32), axes=(None, None, "embed"))
        self.up_bias = nnx.Param(jnp.zeros((k, d), jnp.float32), axes=(None, "embed"))

    def __call__(self, x: jax.Array, train: jax.Array) -> jax.Array:
        """x [b,t,d], train [K] -> [b,K,t,d]; slot k's parameters get gradient ``train[k]``."""
        g2, g3 = train[:, None], train[:, None, None]
        h = jnp.einsum("btd,kdr->bktr", x, _gated(self.down[...], g3)) + _gated(self.down_bias[...], g2)[:, None]
        h = jax.nn.relu(h)                                                                    # [b,K,t,r]
        return jnp.einsum("bktr,krd->bktd", h, _gated(self.up[...], g3)) + _gated(self.up_bias[...], g2)[:, None]


class Descriptors(nnx.Module):
    """K representation descriptors: linear autoencoders d -> rd_dim -> d; ``loss(x_bar, train)`` -> [K,b]."""

    def __init__(self, k: int, d: int, rd_dim: int, *, rngs: nnx.Rngs):
        self.enc = param(rngs, _uniform(1.0 / math.sqrt(d)), (k, d, rd_dim), (None, "embed", None))
        self.enc_bias = nnx.Param(jnp.zeros((k, rd_dim), jnp.float32), axes=(None, None))
        self.dec = param(rngs, _uniform(1.0 / math.sqrt(rd_dim)), (k, rd_dim, d), (None, None, "embed"))
        self.dec_bias = nnx.Param(jnp.zeros((k, d), jnp.float32), axes=(None, "embed"))

    def loss(self, x_bar: jax.Array, train: jax.Array) -> jax.Array:
        g2, g3 = train[:, None], train[:, None, None]
        z = jnp.einsum("bd,kdm->kbm", x_bar, _gated(self.enc[...], g3)) + _gated(self.enc_bias[...], g2)[:, None]
        rec = jnp.einsum("kbm,kmd->kbd", z, _gated(self.dec[...], g3)) + _gated(self.dec_bias[...], g2)[:, None]
        return jnp.mean(jnp.square(rec - x_bar[None]), axis=-1)                              # [K,b]


class Router(nnx.Module):
    """K router columns: logit_k = x_bar . r_k + c_k (torch ``Linear(d, 1)`` init per column)."""

    def __init__(self, k: int, d: int, *, rngs: nnx.Rngs):
        self.kernel = param(rngs, _uniform(1.0 / math.sqrt(d)), (k, d), (None, "embed"))
        self.bias = param(rngs, _uniform(1.0 / math.sqrt(d)), (k,), (None,))

    def __call__(self, x_bar: jax.Array, train: jax.Array) -> jax.Array:
        return x_bar @ _gated(self.kernel[...], train[:, None]).T + _gated(self.bias[...], train)   # [b,K]


def initial_status(num_slots: int) -> np.ndarray:
    """Slot 0 active and trained, created at task 0; the other slots free (CREATED = -1)."""
    s = np.zeros((num_slots, NUM_STATUS), np.float32)
    s[:, CREATED] = -1
    s[0, ACTIVE] = s[0, TRAIN] = 1
    s[0, CREATED] = 0
    return s


class SEMALayer(nnx.Module):
    """The modular adapters of one block (module docstring). ``__call__(x_a)`` -> (branch [b,t,d], aux)."""

    def __init__(self, d: int, *, bottleneck: int, max_adapters: int, rd_dim: int, expandable: bool,
                 router_temperature: float = 1.0, rngs: nnx.Rngs):
        k = max_adapters if expandable else 1
        self.expandable = expandable
        self.temperature = float(router_temperature)
        self.adapters = Adapters(k, d, bottleneck, rngs=rngs)
        self.router = Router(k, d, rngs=rngs) if expandable else None
        self.rds = Descriptors(k, d, rd_dim, rngs=rngs) if expandable else None
        self.status = nnx.Param(jnp.asarray(initial_status(k)), axes=(None, None))

    @property
    def num_slots(self) -> int:
        return self.status.shape[0]

    def __call__(self, x_a: jax.Array):
        st = jax.lax.stop_gradient(self.status[...])                                  # [K, 6]
        active, train = st[:, ACTIVE], st[:, TRAIN]
        x_bar = jnp.mean(x_a.astype(jnp.float32), axis=1)                             # [b,d] token mean
        if self.router is not None:
            logits = jnp.where(active > 0.5, self.router(x_bar, train) / self.temperature, _MASK)   # [b,K]
            weights = jax.nn.softmax(logits, axis=-1) * active                        # none active: all 0
            rd = self.rds.loss(jax.lax.stop_gradient(x_bar), train)                   # [K,b]; RDs train alone
            rd_loss = jnp.sum(jnp.mean(rd, axis=1) * train * active)
        else:
            weights = jnp.broadcast_to(active, (x_a.shape[0], 1))
            rd, rd_loss = None, jnp.zeros((), jnp.float32)
        branch = jnp.einsum("bk,bktd->btd", weights, self.adapters(x_a.astype(jnp.float32), train))
        return branch.astype(x_a.dtype), {"rd_losses": rd, "rd_loss": rd_loss, "weights": weights}


class SEMAViT(nnx.Module):
    """ViT backbone + one ``SEMALayer`` per block + a linear head (module docstring).

    Attributes: the ``ViT`` sizes, plus ``bottleneck`` (adapter width r), ``max_adapters`` (slots per
    expandable layer), ``rd_dim``, ``num_expandable`` (the last blocks that expand) and ``router_temperature``.
    """

    def __init__(self, *, image_size: int = 16, patch_size: int = 4, channels: int = 1, d_model: int = 64,
                 num_layers: int = 4, num_heads: int = 4, mlp_dim: int = 128, num_classes: int = 10,
                 bottleneck: int = 8, max_adapters: int = 4, rd_dim: int = 16, num_expandable: int = 2,
                 router_temperature: float = 1.0, dtype: str = "float32", norm_eps: float = 1e-6,
                 rngs: nnx.Rngs):
        if not 0 <= num_expandable <= num_layers:
            raise ValueError(f"SEMAViT: num_expandable={num_expandable} must be in [0, num_layers={num_layers}]")
        if max_adapters < 1 or bottleneck < 1 or rd_dim < 1 or num_classes < 1:
            raise ValueError("SEMAViT: max_adapters, bottleneck, rd_dim and num_classes must be >= 1")
        self.backbone = ViT(image_size=image_size, patch_size=patch_size, channels=channels, d_model=d_model,
                            num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim, num_classes=0,
                            dtype=dtype, norm_eps=norm_eps, rngs=rngs)
        self.expandable = tuple(range(num_layers - num_expandable, num_layers))
        self.sema = nnx.List([SEMALayer(d_model, bottleneck=bottleneck, max_adapters=max_adapters, rd_dim=rd_dim,
                                        expandable=i in self.expandable, router_temperature=router_temperature,
                                        rngs=rngs) for i in range(num_layers)])
        self.head = Dense(d_model, num_classes, axes=("embed", None), rngs=rngs, use_bias=True)

    def __call__(self, images: jax.Array):
        """images [b,S,S,C] -> (logits [b,K] f32, aux): ``features`` [b,d], ``aux_loss`` (the summed RD loss of
        the TRAIN slots), ``rd_losses`` [E,K,b] (per expandable layer, slot and sample) and ``router_weights``
        [L,b,K_l] (a list)."""
        bb = self.backbone
        x = bb.tokens(images)
        rd, weights, aux_loss = [], [], jnp.zeros((), jnp.float32)
        for block, layer in zip(bb.blocks, self.sema):
            x_a = block.attend(x)
            branch, a = layer(x_a)
            x = x_a + block.feed_forward(x_a) + branch
            aux_loss = aux_loss + a["rd_loss"]
            weights.append(a["weights"])
            if a["rd_losses"] is not None:
                rd.append(a["rd_losses"])
        feats = bb.pool(x)                                                            # [b,d]
        logits = self.head(feats.astype(jnp.float32)).astype(jnp.float32)             # [b,K]
        aux = {"features": feats, "aux_loss": aux_loss, "rd_losses": jnp.stack(rd) if rd else None,
               "router_weights": weights}
        return logits, aux


# ----------------------------------------------------------------------------------------------- host side
def stream_args(config) -> dict:
    """The SEMA settings of a run (``config.init.args``), with defaults; bad values are ``ValueError``s."""
    args = dict(method="sema", phase="func", z_threshold=1.0, detect_batch=64, buffer_size=200)
    given = (config.get("init") or {}).get("args") or {}
    unknown = sorted(set(given.keys()) - set(args))
    if unknown:
        raise ValueError(f"init.args: unknown SEMA key(s) {unknown}; known: {sorted(args)}")
    args.update({k: given[k] for k in given.keys()})
    if args["method"] not in METHODS:
        raise ValueError(f"init.args.method {args['method']!r} unknown; known: {METHODS}")
    if args["phase"] not in PHASES:
        raise ValueError(f"init.args.phase {args['phase']!r} unknown; known: {PHASES}")
    if args["detect_batch"] < 1 or args["buffer_size"] < 3:
        raise ValueError(f"init.args: detect_batch must be >= 1 and buffer_size >= 3, got "
                         f"{args['detect_batch']}, {args['buffer_size']}")
    return args


def statuses(model: SEMAViT) -> list[np.ndarray]:
    """Every layer's status [K_l, 6] as numpy."""
    return [np.array(layer.status[...]) for layer in model.sema]


def set_status(model: SEMAViT, layer: int, status: np.ndarray) -> None:
    model.sema[layer].status[...] = jnp.asarray(status, jnp.float32)


def adapter_counts(model: SEMAViT) -> list[int]:
    """Active adapters per layer."""
    return [int(round(s[:, ACTIVE].sum())) for s in statuses(model)]


@nnx.jit
def _forward(model, images):
    logits, aux = model(images)
    return logits, aux["features"], aux["rd_losses"]


def run_model(model: SEMAViT, images: np.ndarray, batch: int = 64):
    """(logits [n,K], features [n,d], rd_losses [E,K,n]) of ``images`` [n,S,S,C] (model-scaled), computed in
    fixed-size batches (the last one padded) so one program serves every call."""
    n = images.shape[0]
    outs = []
    for i in range(0, n, batch):
        chunk = images[i:i + batch]
        pad = batch - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        lo, fe, rd = jax.device_get(_forward(model, jnp.asarray(chunk)))
        outs.append((lo[:batch - pad], fe[:batch - pad], None if rd is None else rd[..., :batch - pad]))
    logits = np.concatenate([o[0] for o in outs])
    feats = np.concatenate([o[1] for o in outs])
    rd = None if outs[0][2] is None else np.concatenate([o[2] for o in outs], axis=-1)
    return logits, feats, rd


def z_scores(losses: np.ndarray, status: np.ndarray) -> np.ndarray:
    """|l - MU| / SIGMA per slot and sample ([K, n]); 0 for an RD with COUNT <= 2; NaN for inactive slots."""
    mu, sigma, count = status[:, MU, None], status[:, SIGMA, None], status[:, COUNT, None]
    z = np.abs(losses - mu) / np.maximum(sigma, 1e-12)
    z = np.where(count > 2, z, 0.0)
    return np.where(status[:, ACTIVE, None] > 0.5, z, np.nan)


def layer_score(losses: np.ndarray, status: np.ndarray) -> float:
    """The trigger statistic of one layer on a batch: min over active RDs of the batch-mean z."""
    z = z_scores(losses, status)
    means = np.nanmean(z, axis=1) if z.shape[1] else np.full(z.shape[0], np.nan)
    return float(np.nanmin(means)) if np.any(np.isfinite(means)) else 0.0


@dataclasses.dataclass
class Detection:
    """What ``detect`` found: ``layer`` (model layer index) and ``slot`` of the new adapter, or None; the
    ``batch`` that fired; ``scores``[batch][j] = ``layer_score`` of expandable layer j on each batch looked at."""
    layer: int | None
    slot: int | None
    batch: int | None
    scores: list


def detect(model: SEMAViT, images: np.ndarray, task: int, *, threshold: float, batch: int) -> Detection:
    """Bottom-up detection over ``images`` in batches of ``batch`` (module docstring). Does not modify ``model``."""
    st = statuses(model)
    scores = []
    for b, i in enumerate(range(0, images.shape[0], batch)):
        _, _, rd = run_model(model, images[i:i + batch], batch)
        row = [layer_score(rd[j], st[layer]) for j, layer in enumerate(model.expandable)]
        scores.append(row)
        for j, layer in enumerate(model.expandable):
            s = st[layer]
            added_now = np.any((s[:, ACTIVE] > 0.5) & (s[:, CREATED] == task))
            free = np.nonzero(s[:, ACTIVE] < 0.5)[0]
            if row[j] > threshold and not added_now and free.size:
                return Detection(layer, int(free[0]), b, scores)
    return Detection(None, None, None, scores)


def task_scores(model: SEMAViT, images: np.ndarray) -> list[float]:
    """``layer_score`` of every expandable layer over all of ``images`` (the z-score of a task, for plots)."""
    _, _, rd = run_model(model, images)
    st = statuses(model)
    return [layer_score(rd[j], st[layer]) for j, layer in enumerate(model.expandable)]


def activate(model: SEMAViT, layer: int, slot: int, task: int, *, train: bool = True) -> None:
    s = statuses(model)[layer]
    if s[slot, ACTIVE] > 0.5:
        raise ValueError(f"layer {layer} slot {slot} is already active")
    s[slot, [ACTIVE, TRAIN, CREATED, MU, SIGMA, COUNT]] = [1, float(train), task, 0, 0, 0]
    set_status(model, layer, s)


def _train_rows(config, count: int) -> np.ndarray:
    """Model-scaled images of the last ``count`` training examples a run fed (its last steps, newest last)."""
    from sqattn.data import images as images_lib
    ds = images_lib.ImageBatches(config.data, "train", global_batch_size=int(config.batch_size))
    offset = int(config.get("data_offset", 0))
    rows, step = [], int(config.num_steps) - 1
    while sum(r.size for r in rows) < count and step >= 0:
        rows.insert(0, ds.rows(step + offset)[0])
        step -= 1
    return ds.all_images()[np.concatenate(rows)[-count:]]


def freeze(model: SEMAViT, src_config) -> dict:
    """Freezes the slots ``src_config``'s run trained (TRAIN -> 0). After an rd or joint run, first records each
    trained RD's MU / SIGMA / COUNT from its losses on the run's last ``buffer_size`` training examples.
    Returns {layer: (mu, sigma, count)} of the RDs it recorded."""
    args = stream_args(src_config)
    st = statuses(model)
    recorded = {}
    if args["phase"] in ("rd", "joint"):
        images = _train_rows(src_config, args["buffer_size"])
        _, _, rd = run_model(model, images)
        for j, layer in enumerate(model.expandable):
            for k in np.nonzero((st[layer][:, TRAIN] > 0.5) & (st[layer][:, ACTIVE] > 0.5))[0]:
                losses = rd[j, k]
                st[layer][k, [MU, SIGMA, COUNT]] = [losses.mean(), losses.std(ddof=1), losses.size]
                recorded[layer] = tuple(float(v) for v in st[layer][k, [MU, SIGMA, COUNT]])
    for layer, s in enumerate(st):
        s[:, TRAIN] = 0
        set_status(model, layer, s)
    return recorded


def set_prototypes(model: SEMAViT, config) -> list[int]:
    """Head rows of the current task's classes := nearest-class-mean weights of the backbone features."""
    from sqattn.data import images as images_lib
    ds = images_lib.ImageBatches(config.data, "train", global_batch_size=1)
    _, feats, _ = run_model(model, ds.all_images())
    kernel, bias = np.array(model.head.kernel[...]), np.array(model.head.bias[...])
    classes = sorted(set(ds._y.tolist()))
    for c in classes:
        p = feats[ds._y == c].mean(0)
        kernel[:, c], bias[c] = p, -0.5 * float(p @ p)
    model.head.kernel[...] = jnp.asarray(kernel)
    model.head.bias[...] = jnp.asarray(bias)
    return classes


def _task_images(config) -> np.ndarray:
    from sqattn.data import images as images_lib
    return images_lib.ImageBatches(config.data, "train", global_batch_size=1).all_images()


def _build(config) -> SEMAViT:
    """``config.model`` initialised from ``config.seed``, built inside one jit (eager init is slow)."""
    from sqattn.train import state as state_lib
    return nnx.jit(lambda: state_lib.build_base_model(config))()


def start(src_model, src_config, config) -> SEMAViT:
    """``init.transform`` of a stream's first run: the trained ``ViT`` of ``src_model`` becomes the (frozen)
    backbone of a fresh ``SEMAViT``; slot 0 of every layer is active and trained (prototypes: none active,
    the head holds the first task's class means)."""
    from sqattn.models import convert
    if not isinstance(src_model, ViT):
        raise ValueError(f"sema.start needs a ViT run as init.workdir, got a {type(src_model).__name__}")
    model = _build(config)
    report = convert.transplant(src_model, model.backbone)
    if report["missing_in_src"]:
        raise ValueError(f"sema.start: the source ViT lacks backbone parameters {report['missing_in_src'][:4]} "
                         f"(the two ViT configs differ)")
    args = stream_args(config)
    if args["method"] == "prototypes":
        for layer, s in enumerate(statuses(model)):
            s[:, ACTIVE] = s[:, TRAIN] = 0
            set_status(model, layer, s)
        set_prototypes(model, config)
    return model


def plan(src_model: SEMAViT, src_config, config) -> tuple[SEMAViT, dict]:
    """The model of ``config``'s run made from the previous run's model, and what was done (``advance``).

    Info keys: ``method``, ``phase``, ``task``, ``recorded`` (RD statistics frozen), ``task_scores`` (z per
    expandable layer over the task's training examples, before any change; ``sema`` func runs), ``detection``
    (``Detection`` as a dict), ``expanded`` ([(layer, slot), ...] activated by this step), ``adapters``
    (active per layer after it).
    """
    if not isinstance(src_model, SEMAViT):
        raise ValueError(f"sema.advance needs a SEMAViT run as init.workdir, got a {type(src_model).__name__}")
    args = stream_args(config)
    task = int(config.data.task)
    model = src_model
    info = dict(method=args["method"], phase=args["phase"], task=task, recorded={}, task_scores=None,
                detection=None, expanded=[])
    if args["phase"] == "rd":                     # train the RDs of the slots the func run trained
        info["adapters"] = adapter_counts(model)
        return model, info
    info["recorded"] = freeze(model, src_config)
    method = args["method"]
    if method == "sema":
        images = _task_images(config)
        info["task_scores"] = task_scores(model, images)
        det = detect(model, images, task, threshold=float(args["z_threshold"]), batch=int(args["detect_batch"]))
        info["detection"] = dataclasses.asdict(det)
        if det.layer is not None:
            activate(model, det.layer, det.slot, task)
            info["expanded"].append((det.layer, det.slot))
    elif method == "expand_every":
        for layer in model.expandable:
            s = statuses(model)[layer]
            if np.any((s[:, ACTIVE] > 0.5) & (s[:, CREATED] == task)):
                continue                          # this task already added here
            free = np.nonzero(s[:, ACTIVE] < 0.5)[0]
            if free.size:
                activate(model, layer, int(free[0]), task)
                info["expanded"].append((layer, int(free[0])))
    elif method == "ft_adapter":
        for layer, s in enumerate(statuses(model)):
            s[:, TRAIN] = s[:, ACTIVE]
            set_status(model, layer, s)
    else:                                          # prototypes
        set_prototypes(model, config)
    info["adapters"] = adapter_counts(model)
    return model, info


def advance(src_model, src_config, config) -> SEMAViT:
    """``init.transform`` of every later run of a stream: ``plan(...)[0]``."""
    return plan(src_model, src_config, config)[0]


def trainable_params(model: SEMAViT, phase: str, method: str) -> int:
    """Parameters a run of ``phase`` trains in ``model``: its TRAIN slots' adapters and router columns (func)
    or RDs (rd), plus the head in a func run; 0 for prototypes."""
    if method == "prototypes":
        return 0
    total = 0
    for layer, s in zip(model.sema, statuses(model)):
        n = int(round(s[:, TRAIN].sum()))
        func = [layer.adapters] + ([layer.router] if layer.router is not None else [])
        rd = [layer.rds] if layer.rds is not None else []
        parts = {"func": func, "rd": rd, "joint": func + rd}[phase]
        per_slot = sum(int(np.prod(v.shape)) for p in parts for v in jax.tree.leaves(nnx.state(p, nnx.Param)))
        total += n * per_slot // layer.num_slots
    if phase != "rd":
        total += int(np.prod(model.head.kernel.shape)) + int(np.prod(model.head.bias.shape))
    return total


def adapter_params(model: SEMAViT) -> int:
    """Parameters held by the active slots (adapters, router columns and RDs), the model's growth."""
    total = 0
    for layer, s in zip(model.sema, statuses(model)):
        parts = [p for p in (layer.adapters, layer.router, layer.rds) if p is not None]
        per_slot = sum(int(np.prod(v.shape)) for p in parts for v in jax.tree.leaves(nnx.state(p, nnx.Param)))
        total += int(round(s[:, ACTIVE].sum())) * per_slot // layer.num_slots
    return total
