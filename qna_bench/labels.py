"""Names shared by the measuring side and the pure analysis, without torch: a layer's compile forms, whether
a row ran tuned or as shipped, roles, QnA's passes and the canary's size (which the report names)."""

from __future__ import annotations

from typing import Any, Literal, get_args

CompileMode = Literal["eager", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
EAGER = "eager"

# A sweep measures each tunable layer in its tuned form, and with ``as_shipped`` also as built: a row's
# ``tuning`` column says which.
TUNED, SHIPPED = "tuned", "shipped"

# What a layer is in the comparison, declared at registration (nothing infers it from a name):
# subject: QnA, the layer under test; peer: an attention layer QnA is judged against (grouped by family:
# swin, neighborhood, sasa, halo, global); baseline: a convolution, shown but outside the verdicts;
# reference: an exact oracle kept for correctness (e.g. qna_reference, na_torch), outside the verdicts.
Role = Literal["subject", "peer", "baseline", "reference"]
ROLES: tuple[str, ...] = get_args(Role)


def mode_of(value: Any) -> str:
    """A row's compile mode: rows written before the column, or with it null, ran eager."""
    return value if isinstance(value, str) and value else EAGER


def is_compiled(value: Any) -> bool:
    return mode_of(value) != EAGER


def form_label(mode: Any) -> str:
    """``compiled:default`` for a compiled form, "" for eager."""
    return f"compiled:{mode_of(mode)}" if is_compiled(mode) else ""


# The passes of QnA's fast form, in order (`qna_bench.qna.plans.Plan`): the report orders a plan's forms by them.
QNA_PASSES: tuple[str, ...] = ("convolutions", "numerators", "numerator_grads", "kernel_grads")
# The canary's product (`qna_bench.measure.canary`): 384² fp32 matrices, 113 MFLOP, about a millisecond on
# two CPU cores, its 1.7 MiB in cache.
CANARY_SIZE = 384
