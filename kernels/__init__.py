"""Device compute: fused ops with their torch references, quantization, collectives.

Nothing here imports the rest of terarec.
"""
from .cross import cross_v1, cross_v2
from .interaction import dot_interaction, interaction_output_dim
from .mlp import fused_mlp

__all__ = ["cross_v1", "cross_v2", "dot_interaction", "fused_mlp", "interaction_output_dim"]
