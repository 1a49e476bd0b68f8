"""Pure tensor math of the RL algorithms (no torch.distributed, no Megatron).

* ``advantages``: group-normalized outcome advantages (GRPO, Dr.GRPO) with an estimator registry.
* ``losses``: PPO clip-higher / dual-clip policy loss, KL and entropy terms, global token-mean aggregation.
* ``dynamic_sampling``: DAPO group filtering, over-sampling bookkeeping, soft overlong punishment.
* ``vgpo``: VGPO visual focus score, token and trajectory factors, advantage re-weighting.
* ``vgpo_diagnostics``: the spec 7.2 training metrics, merged exactly over CPU row blocks.
* ``focus``: raw token/image-prototype cosines from final-norm hidden states (input of ``vgpo``).
"""

from megatron_vgpo.algo.advantages import compute_outcome_advantages, register_advantage_estimator
from megatron_vgpo.algo.dynamic_sampling import (
    DynamicSamplingBuffer,
    DynamicSamplingExhausted,
    disagreement_fraction,
    group_filter_mask,
    overlong_penalty,
)
from megatron_vgpo.algo.losses import policy_loss
from megatron_vgpo.algo.vgpo import (
    TokenWeights,
    VGPOConfig,
    VGPOFactors,
    apply_vgpo,
    compute_token_weights,
    compute_vgpo_factors,
    focus_from_cosine,
    trajectory_factors,
)

__all__ = [
    "DynamicSamplingBuffer",
    "DynamicSamplingExhausted",
    "TokenWeights",
    "VGPOConfig",
    "VGPOFactors",
    "apply_vgpo",
    "compute_outcome_advantages",
    "compute_token_weights",
    "compute_vgpo_factors",
    "disagreement_fraction",
    "focus_from_cosine",
    "group_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "register_advantage_estimator",
    "trajectory_factors",
]
