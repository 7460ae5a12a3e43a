"""Device compute: fused ops with their torch references, quantization, collectives.

Each public op runs its fused Triton kernel on CUDA (see `dispatch.use_fused`;
TERAREC_FUSED=0 turns them off) and its torch reference elsewhere. The Triton
modules (`triton_*.py`) are imported only when a fused kernel runs. Under
`torch.autocast` every op computes in the autocast dtype (`dispatch.py`); the
run's precision setting lives in `precision.py`. Nothing here imports the rest
of terarec.
"""
from .cross import cross_v1, cross_v2
from .gather import gather_rows, gather_sum, reduce_by_key
from .interaction import dot_interaction, interaction_output_dim
from .mlp import fused_mlp

__all__ = ["cross_v1", "cross_v2", "dot_interaction", "fused_mlp", "gather_rows", "gather_sum",
           "interaction_output_dim", "reduce_by_key"]
