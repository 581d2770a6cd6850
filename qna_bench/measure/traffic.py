"""Closed-form memory traffic: the fewest bytes a layer's algorithm moves, from the tensors it must touch.

A layer lists, in elements, what it reads (inputs, parameters), what it writes (outputs) and the
intermediates its algorithm writes and reads back; `traffic_bytes` turns them into bytes for the
problem's dtype and mode. Layout copies are not counted: they are the implementation's, not the
algorithm's, and a minimum must not overcount (an overcount would lower the roof under a point).
"""

from __future__ import annotations

from collections.abc import Iterable

from qna_bench.problem import Problem


def traffic_bytes(
    problem: Problem, *, inputs: int, params: int, outputs: int, intermediates: Iterable[int] = ()
) -> int:
    """Bytes moved by one call: inputs and parameters read, outputs written, intermediates written
    and read back once each.

    Train mode adds the backward: the output gradient read; each intermediate read again (saved or
    recomputed) and its gradient written and read; inputs and parameters read again and their
    gradients written.
    """
    between = sum(intermediates)
    forward = inputs + params + outputs + 2 * between
    if problem.mode != "train":
        return forward * problem.torch_dtype.itemsize
    backward = outputs + 3 * between + 2 * inputs + 2 * params
    return (forward + backward) * problem.torch_dtype.itemsize
