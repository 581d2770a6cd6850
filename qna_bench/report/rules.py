"""The rules the report states beside its tables, as written text: how each verdict, form and model table is read.
"""

from __future__ import annotations

from qna_bench.analysis import (
    BEAT_FACTOR,
    EXPONENT_MARGIN,
    MIN_GROWTH_POINTS,
    POOR_FIT_R2,
    POOR_FIT_RMS,
)

REPORT_FILE = "report.md"


RULES = f"""\
Roles are declared in the layer registry (`python -m qna_bench.registry`): the **subject** is QnA (`qna`),
the **peers** are the attention layers it is judged against, grouped by family; **baselines**
(convolutions) and **references** (exact oracles kept for correctness, e.g. `qna_reference`, `na_torch`)
are shown in the tables but never vote. A ratio is a peer's value divided by QnA's at the same problem
(device, dtype, threads, torch version, batch, map, channels, heads, stride, dilation), mode and window;
above 1 QnA is leaner / faster. Each problem shape gets its own verdict.

- **Memory** (T = 10×, peak memory above inputs; a `timeout` row counts, its memory pass completed) and
  **speed** (T = 5×, latency: with rounds, the geometric mean over the rounds of the ratio of the two
  layers' round times, each the geometric mean of the round's blocks; without, the ratio of the
  medians): at each window the *strongest peer* is the peer with the smallest ratio among those measured
  there; the claim **holds** if QnA is at least T times better than the
  strongest peer at some window, **holds partly** if at least {BEAT_FACTOR:g}× there, and **does not hold**
  otherwise; QnA *loses* where the strongest peer's ratio is below 1.
- **Per family**: the same rule with each family's strongest member at each window in place of the
  strongest peer. *What ran* gives the backend those rows record (NATTEN's own choice for `na`), and says
  when it is a fallback standing in for the family's own fused kernels.
- **Scaling**: for each peer that uses the window and each metric, both growth exponents (slope of
  log(metric) on log(k)) are fitted over the windows both layers measured; a comparison votes only with
  at least {MIN_GROWTH_POINTS} shared windows and no poor fit (R² < {POOR_FIT_R2:g} with an RMS log residual
  over {POOR_FIT_RMS:g}), and QnA grows more slowly when e_QnA ≤ e_peer − {EXPONENT_MARGIN:g}; the claim **holds**
  if QnA grows more slowly in every vote, **holds partly** in some, and **does not hold** in none.
- **Overall** (per claim and problem, over modes; and per claim over everything): **holds** if every
  tested verdict holds, **holds partly** if at least one holds or holds partly, otherwise **does not hold**.
- Peers without a number where QnA has one (timeout, oom, skipped, unsupported, error) are named under each
  verdict and count in no ratio.
"""


FORMS_RULES = """\
Each layer ran in more than one form: eager and compiled with `torch.compile` (`compile=`). Every ratio,
verdict and figure takes each layer at its best form at each point: its `ok` form with the lowest median
latency (the eager row where none is `ok`). Speedup = eager ms / compiled ms (above 1 the compiled form is
faster); compile s = the first, compiling call's seconds minus the median steady call, spent once per process
in the warm-up and never in a timed call."""


SHIPPED_RULES = """\
Each layer that has forms to choose (`python -m qna_bench.registry` lists them: QnA its plan and the GEMM
library of its projections, every peer the GEMM library of its `nn.Linear`s and 1×1 convolutions) ran
twice at each point, timed in the same interleaved rounds: as built (*shipped*) and in the form its tuner
chose (*tuned*; `qna_bench.tuner`: every candidate proved equal to the layer as built, warmed, then timed
in interleaved rounds). Speedup = shipped ms / tuned ms: what tuning bought that layer. Every ratio,
verdict and figure takes each layer at its best form."""


MODELS_RULES = """\
Whole backbones (registry kind `model`; random initialisation, 1000 classes). The layer claims do not
apply at this level: each model is described by its throughput, memory and size, then set against
QnA-ViT. Images/s = batch / median latency (forward: inference; train: forward + backward). Peak memory is
above the inputs. Params are counted on the built model; GMACs are per image, from the forward row
(FLOPs / 2 / batch), counted by the FLOP counter or, where it cannot see a layer, the closed form. The
published figures are those the model's registry entry quotes (`python -m qna_bench.registry`); n/a where
it quotes none."""
