"""Array type aliases (jaxtyping) and the dimension legend used across sqattn.

Legend:  b batch, t time/sequence, d model width, h heads, g kv-heads (GQA groups), k key dim per head,
v value dim per head, n state size / partitions, e experts, V vocabulary.
"""

from jaxtyping import Array, Float, Int

Activations = Float[Array, "b t d"]
TokenActivations = Float[Array, "b d"]
Tokens = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]
Logits = Float[Array, "b t V"]

__all__ = ["Array", "Float", "Int", "Activations", "TokenActivations", "Tokens", "SegmentIds", "Logits"]
