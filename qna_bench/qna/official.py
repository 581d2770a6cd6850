"""Loading the parameters of the official Flax ``FusedKQnA`` (repo moabarar/qna, ``layers/qna.py``).

Mapping from the official Flax ``FusedKQnA`` (repo moabarar/qna, ``layers/qna.py``). Flax dense
kernels are (in, out); the convolution-shaped tensors are HWIO; the official channel index of the
query/head axis is ``n * heads + head`` (query-major) and the feature index is ``head * d + i``:

==========================  =====================================  ==========================================
official parameter          official shape                         ours
==========================  =====================================  ==========================================
``query``                   (Nq, F)                                ``query`` (Nq, h, d) = reshape
``Wk``                      (C_in, F)                              ``key_weight`` (C_in, h, d) = reshape
``Wk_b`` (use_bias only)    (h, d)                                 dropped: adds a constant per query and head
                                                                   to every logit of a window, so it cancels
                                                                   exactly in the softmax
``to_v/kernel``, ``bias``   (C_in, F), (F,)                        ``value_proj.weight`` = kernel.T, ``.bias``
``rpe_bias``                (k*k, Nq*h)                            ``rpe_bias`` (Nq, h, k, k):
                                                                   ``reshape(k, k, Nq, h).permute(2, 3, 0, 1)``
``attn_scale_weights``      (1, 1, k*k, Nq*h)                      ``query_mixing`` (Nq, h, k, k): same as rpe
``to_out/kernel``, ``bias`` (F, F_out), (F_out,)                   ``out_proj.weight`` = kernel.T, ``.bias``
==========================  =====================================  ==========================================

`load_official_params` applies this mapping to a (nested or '/'-flattened) dict of arrays.
Only the released configuration is covered: relative position bias, ``attn_scale='normal'``,
``padding = (k - 1) // 2``, ``scale_rpe_bias=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def load_official_params(module: nn.Module, params: Mapping[str, Any]) -> None:
    """Copy the parameters of an official Flax ``FusedKQnA`` into ``module``, a `QnA`.

    ``params`` is that module's parameter dict (nested as Flax gives it, or flattened with '/'
    keys such as ``"to_v/kernel"``) of numpy or torch arrays (``np.asarray`` turns jax arrays into
    numpy ones). ``Wk_b`` is ignored (it cancels); the projection biases must match ``bias``.
    """
    flat = _flatten(params)
    heads, window = module.heads, module.window
    has_bias = module.value_proj.bias is not None
    if ("to_v/bias" in flat) != has_bias:
        raise ValueError(
            f"params: official biases {'present' if not has_bias else 'absent'}, but this QnA has bias={has_bias}"
        )

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in flat:
            raise ValueError(f"params: missing official parameter {name!r} (have {sorted(flat)})")
        t = torch.as_tensor(flat[name])
        if tuple(t.shape) != shape:
            raise ValueError(f"params[{name!r}].shape={tuple(t.shape)}: this QnA expects {shape}")
        return t

    def per_query_head(t: Tensor) -> Tensor:  # (k*k, Nq*h) in HWIO order -> (Nq, h, k, k)
        return t.reshape(window, window, module.num_queries, heads).permute(2, 3, 0, 1)

    nqh = module.num_queries * heads
    module.query.copy_(get("query", (module.num_queries, module.features)).reshape(module.query.shape))
    module.key_weight.copy_(get("Wk", (module.in_channels, module.features)).reshape(module.key_weight.shape))
    module.rpe_bias.copy_(per_query_head(get("rpe_bias", (window * window, nqh))))
    module.query_mixing.copy_(per_query_head(get("attn_scale_weights", (1, 1, window * window, nqh))))
    for ours, theirs, fan_out in (
        (module.value_proj, "to_v", module.features),
        (module.out_proj, "to_out", module.out_features),
    ):
        ours.weight.copy_(get(f"{theirs}/kernel", (ours.in_features, fan_out)).T)
        if ours.bias is not None:
            ours.bias.copy_(get(f"{theirs}/bias", (fan_out,)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
