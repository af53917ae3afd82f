"""Parameter-efficient fine-tuning: functions that wrap an existing model's linear layers in place.

``lora``: ``apply_lora(model, ("q", "k", "v"), rank=8, alpha=8.0, rngs=...)`` wraps the named ``Dense`` layers
in ``LoRADense``; train only ``LoRAParam`` (``nnx.DiffState(0, LoRAParam)``); ``merge_lora`` folds the adapters
back into plain ``Dense`` kernels.
"""

# config.peft.method -> "module:function"(model, peft_config, rngs) -> model (adapters applied in place).
# The module may also define ``make_hook(config)`` (a trainer host hook, e.g. a rank allocator).
METHODS: dict[str, str] = {
    "lora": "sqattn.peft.lora:from_config",
    "triadapt": "sqattn.peft.adaptive:from_config",
    "adalora": "sqattn.peft.adaptive:from_config",
    "increlora": "sqattn.peft.adaptive:from_config",
    "spm": "sqattn.peft.spm:from_config",
}

from sqattn.peft.lora import (LoRADense, LoRAParam, apply_lora, count_params, merge_lora,  # noqa: F401
                              trainable)
