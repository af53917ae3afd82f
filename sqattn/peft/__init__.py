"""Parameter-efficient fine-tuning: functions that wrap an existing model's linear layers in place.

``lora``: ``apply_lora(model, ("q", "k", "v"), rank=8, alpha=8.0, rngs=...)`` wraps the named ``Dense`` layers
in ``LoRADense``; train only ``LoRAParam`` (``nnx.DiffState(0, LoRAParam)``); ``merge_lora`` folds the adapters
back into plain ``Dense`` kernels.
"""

from sqattn.peft.lora import (LoRADense, LoRAParam, apply_lora, count_params, merge_lora,  # noqa: F401
                              trainable)
