"""Names shared by the measuring side and the pure analysis, without torch: a layer's compile forms, whether
a row ran tuned or as shipped, and roles."""

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
