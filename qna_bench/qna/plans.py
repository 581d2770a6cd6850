"""Plans: one frozen value names the form of every pass of QnA's fast form for a call.

The candidates are a small registry (`register_plan`): each `Plan` says which devices it runs on and
which form each pass takes; `available_plans` lists the names a device can run, `get_plan` looks one
up, and `default_plan` is the plain, machine-independent choice of ``tune="off"``. Which plan is
fastest for a call is measured, not written down per instruction set (`qna_bench.qna.tuning`).
A GPU plan is one more `register_plan` entry, with the forms its kernels implement.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

from qna_bench.labels import QNA_PASSES as PASSES
from qna_bench.qna.projection import Projection

ConvForm = Literal["direct", "padded"]
Form = Literal["direct", "fft", "fused"]
Kernel = Literal["convolutions", "triton"]

# Bytes of one chunk's spectrum in the FFT kernel gradients and numerators: the extra memory is a few
# such buffers, small next to the activations. AVX2, 2 threads, QnA(128, 128, 4), B=8, 56x56 (median of
# 3 rounds' best of 3, ms; train peak by `cpu_peak`, MiB): 0.5/1/2/4 MiB gave train 549/420/378/375 ms
# at k=31 and 397/369/305/303 at k=13; 2 MiB peaks at 78.7 (k=31) and 90.9 (k=3, direct), 4 MiB at
# 88.0 and 97.0 (k=9).
FFT_CHUNK_BYTES = 1 << 21


@dataclass(frozen=True)
class Plan:
    """The form of each pass of the fast form, and the devices it runs on.

    convolutions: the direct depthwise convolutions (denominators, direct numerators, stride-1 input
        gradients) at the window k (``direct``) or through the zero-padded kernel of k + 2 (``padded``,
        stride 1; an exact rewrite that reaches another oneDNN kernel).
    numerators: the forward numerators as direct convolutions, FFT convolutions (stride 1), or ``fused``:
        each window's denominators and numerators in one sweep of loops compiled for the CPU that runs
        them (`qna_bench.qna.fused_cpu`).
    numerator_grads: the backward's numerator work (the numerators again, their input and kernel
        gradients) direct, on FFT spectra shared per chunk (stride 1), or ``fused``: the core's whole
        backward, both kernel gradients included, in the fused loops (with fused numerators only: it
        reads the queries' shares of z that the fused forward keeps).
    kernel_grads: the kernel gradients left to compute (the denominators', and the numerators' unless
        ``numerator_grads`` is ``fft``) by PyTorch's convolution backward or as FFT cross-correlations;
        ``fused`` with a fused backward, which computes them.
    fft_chunk_bytes: the spectrum bytes per chunk of every FFT pass.
    fused_vector_bytes: the widest vectors the fused loops' channel sweeps may use (0: the widest they
        were compiled for, `qna_bench.qna.fused_cpu.vector_bytes`).
    min_window: the tuner times this plan from this window on (any plan can be forced at any window).
    kernel: ``convolutions`` (the passes above, in PyTorch) or ``triton`` (the whole core as Triton
        kernels, `qna_bench.qna.triton_core`; the convolution forms then do not apply).
    tuned_on: the device types whose tuner times this plan (default: all of ``devices``); a plan that
        runs on a device only to be checked there (Triton's CPU interpreter) is forced, never tuned.
    projections: the form of the layer's two pointwise projections around the core
        (`qna_bench.qna.projection`); every registered plan says ``linear``, and the tuner times the
        other form on the winning plan.

    Every FFT pass runs only where the data let an FFT resolve it (`qna_bench.qna.fft.fft_resolves`);
    elsewhere the call falls back to the direct form of that pass and says so.
    """

    name: str
    devices: tuple[str, ...]
    convolutions: ConvForm = "direct"
    numerators: Form = "direct"
    numerator_grads: Form = "direct"
    kernel_grads: Form = "direct"
    fft_chunk_bytes: int = FFT_CHUNK_BYTES
    fused_vector_bytes: int = 0
    min_window: int = 1
    kernel: Kernel = "convolutions"
    tuned_on: tuple[str, ...] | None = None
    projections: Projection = "linear"
    description: str = ""

    def __post_init__(self) -> None:
        if self.numerator_grads == "fused" and self.numerators != "fused":
            raise ValueError(f"plan {self.name!r}: numerator_grads='fused' needs numerators='fused'")

    def resolved(self, stride: int, train: bool) -> Plan:
        """This plan as a call of ``stride`` in forward (``train=False``) or train mode runs it: the
        stride-1-only passes direct at stride 2, the backward's passes direct without a backward."""
        changes: dict[str, str] = {}
        if stride != 1:  # the fused loops run at any stride
            changes.update(convolutions="direct")
            changes.update({p: "direct" for p in ("numerators", "numerator_grads") if getattr(self, p) == "fft"})
        if not train:
            changes.update(numerator_grads="direct", kernel_grads="direct")
        return dataclasses.replace(self, **changes)

    @property
    def forms(self) -> tuple[str, ...]:
        """What runs in the core, pass by pass (equal forms: the same work, whatever the names)."""
        if self.kernel != "convolutions":
            return (self.kernel,)
        return (*(getattr(self, p) for p in PASSES), str(self.fft_chunk_bytes if self.uses_fft else 0),
                str(self.fused_vector_bytes if self.uses_fused else 0))

    @property
    def uses_fused(self) -> bool:
        return self.kernel == "convolutions" and "fused" in (self.numerators, self.numerator_grads)

    @property
    def uses_fft(self) -> bool:
        return self.kernel == "convolutions" and "fft" in (self.numerators, self.numerator_grads, self.kernel_grads)

    def spec(self) -> str:
        """This plan as a string (`plan_from_spec` reads it back): how it reaches QnA's custom ops,
        whose arguments are tensors, numbers and strings."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def passes_run(train: bool) -> tuple[str, ...]:
        """The passes a call runs: all in train, the forward's two without a backward."""
        return PASSES if train else PASSES[:2]

    def record(self, train: bool) -> dict[str, str]:
        """A readable name per pass that runs in this mode, for a row's ``layer_flags``."""
        if self.kernel != "convolutions":
            return {"kernel": self.kernel, "projections": self.projections}
        record = {p: getattr(self, p) for p in self.passes_run(train)}
        if self.uses_fft:
            record["fft_chunk_bytes"] = str(self.fft_chunk_bytes)
        return {**record, "projections": self.projections}


@functools.lru_cache(maxsize=256)
def plan_from_spec(spec: str) -> Plan:
    """The plan `Plan.spec` wrote (registered or not: a resolved plan is a variant of a registered one)."""
    fields = json.loads(spec)
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


_PLANS: dict[str, Plan] = {}


def register_plan(plan: Plan) -> Plan:
    """Add ``plan`` to the candidates; its name must be new."""
    if plan.name in _PLANS:
        raise ValueError(f"plan {plan.name!r} is registered twice")
    _PLANS[plan.name] = plan
    return plan


def plan_names() -> list[str]:
    """Every registered plan's name, whatever its devices."""
    return list(_PLANS)


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def _runs_on(plan: Plan, device: str | torch.device) -> bool:
    if _device_type(device) not in plan.devices:
        return False
    if plan.uses_fused:
        from qna_bench.qna.fused_cpu import vector_bytes

        compiled = vector_bytes()  # None where the loops are unavailable
        return compiled is not None and plan.fused_vector_bytes < compiled
    if plan.kernel == "triton":
        if _device_type(device) == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False  # decided without importing Triton
        from qna_bench.qna.triton_core import triton_available

        return triton_available(device)
    return True


def available_plans(device: str | torch.device) -> list[str]:
    """The names of the plans that can run on ``device`` (a str or torch.device), in registry order; the
    Triton plan on CUDA, and on CPU only in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return [name for name, plan in _PLANS.items() if _runs_on(plan, device)]


def get_plan(name: str, device: str | torch.device) -> Plan:
    """The plan called ``name``; ValueError naming the allowed values when it cannot run on ``device``."""
    plan = _PLANS.get(name)
    if plan is None or not _runs_on(plan, device):
        allowed = ", ".join(available_plans(device))
        raise ValueError(f"plan={name!r}: QnA's plans on {_device_type(device)} are {allowed}")
    return plan


def candidate_plans(device: str | torch.device, window: int, stride: int, train: bool) -> list[Plan]:
    """The plans worth timing for a call: those of ``device`` from their ``min_window``, one per
    distinct resolved form (the first registered wins), each resolved for ``stride`` and the mode."""
    seen: dict[tuple[str, ...], Plan] = {}
    for name in available_plans(device):
        plan = _PLANS[name]
        if window >= plan.min_window and _device_type(device) in (plan.tuned_on or plan.devices):
            resolved = plan.resolved(stride, train)
            seen.setdefault(resolved.forms, resolved)
    return list(seen.values())


# The kernel gradients from this window on run as FFTs in the default plan, on every machine: their
# direct form's cost grows with k^2 and the FFT's does not (on 2-core AMD EPYCs with AVX-512 and with
# AVX2 the FFT won a whole QnA(128, 128, 4) train step from k=7 at stride 1).
DEFAULT_FFT_KERNEL_GRAD_WINDOW = 7


def default_plan(device: str | torch.device, window: int, stride: int, train: bool) -> Plan:
    """The plain choice of ``tune="off"``, the same on every machine: direct everywhere, the kernel
    gradients as FFTs from `DEFAULT_FFT_KERNEL_GRAD_WINDOW` where the device has that plan."""
    fft = train and window >= DEFAULT_FFT_KERNEL_GRAD_WINDOW and "fft_kernel_grads" in available_plans(device)
    name = "fft_kernel_grads" if fft else "direct"
    return get_plan(name, device).resolved(stride, train)


# The candidates. Direct runs everywhere, and so do the FFT forms (torch.fft: MKL/pocketfft on CPU, cuFFT
# on CUDA); padded is a CPU form. Their speed against direct depends on the machine, the threads, the
# window and the shape (the measurements below are why each exists).
register_plan(Plan("direct", ("cpu", "cuda"), description="every pass a direct depthwise convolution"))
# oneDNN's depthwise forward with AVX-512 and 2 threads (B=8, 56x56, C=128, fp32) took 20 ms at k=13
# against 9.9 ms at k=15, and QnA inherited the dip (train 257 vs 178 ms with k=13 run as 15); with AVX2
# padding made QnA slower (train 396 vs 468 ms).
register_plan(Plan("padded", ("cpu",), convolutions="padded", min_window=5,
                   description="direct convolutions through the zero-padded kernel of k + 2"))
# PyTorch's depthwise kernel gradient on CPU grows with k^2 and collapses at large windows (k=15: 840 ms
# against 34 for the FFT, one query's 128 channels, B=8 56x56); at k=3 it is 13x faster than the FFT.
register_plan(Plan("fft_kernel_grads", ("cpu", "cuda"), kernel_grads="fft", min_window=5,
                   description="direct convolutions, FFT kernel gradients"))
register_plan(Plan("padded_fft_kernel_grads", ("cpu",), convolutions="padded", kernel_grads="fft", min_window=5,
                   description="padded direct convolutions, FFT kernel gradients"))
# One depthwise convolution of 128 channels with AVX2 (B=8, 56x56): oneDNN k=7 8.8 ms, k=31 140; FFT
# 35-58 at any k. The backward's three numerator convolutions on shared spectra won a train step from
# k=5-7 there, the forward's from k=13-15.
register_plan(Plan("fft_backward", ("cpu", "cuda"), numerator_grads="fft", kernel_grads="fft", min_window=5,
                   description="direct forward; backward numerators on shared FFT spectra, FFT kernel gradients"))
register_plan(Plan("fft", ("cpu", "cuda"), numerators="fft", numerator_grads="fft", kernel_grads="fft", min_window=5,
                   description="numerators as FFT convolutions in both passes, FFT kernel gradients"))
# Never measured faster in a train step (the forward's FFT wins at larger windows than the backward's);
# kept to force and check the forward's FFT alone.
register_plan(Plan("fft_forward", ("cpu", "cuda"), numerators="fft", min_window=1 << 30,
                   description="FFT numerators in the forward, a direct backward"))
# Each window's softmax in direct loops compiled for this CPU: no per-tap temporaries, the two queries of
# a head sharing each value's loads, the backward in two sweeps (per output, per input pixel) that read
# the queries' shares of z kept by the forward (so the backward needs the fused forward). Its cost grows
# with k^2 like the direct form's. AVX-512 EPYC, 2 threads, B=8 56x56, C=128, k=7: forward 4.6 ms and
# backward 14 ms (19 when it recomputed the numerators) against oneDNN's 5-15 and the FFT backward's 40.
register_plan(Plan("fused", ("cpu",), numerators="fused", numerator_grads="fused", kernel_grads="fused",
                   description="the windowed softmax in fused loops compiled for this CPU, both passes"))
# The same loops in 32-byte vectors, listed where they were compiled for 64-byte ones. The AVX-512 EPYC
# (family 25, 2 threads, B=8 56x56, C=128 in 4 heads, k=7) ran one library's backward faster at 32 bytes
# than at 64, 24.3 against 32.2 ms, and its forward at par, 7.3 against 7.5.
register_plan(Plan("fused_32", ("cpu",), numerators="fused", numerator_grads="fused", kernel_grads="fused",
                   fused_vector_bytes=32,
                   description="the fused loops in 32-byte vectors where they were compiled for wider ones"))
# The whole core as Triton kernels (`qna_bench.qna.triton_core`): one pass over each window with an
# online softmax, nothing of size k^2 per pixel, on the GPU; on CPU only in Triton's interpreter, to be
# forced and checked against the reference, never timed.
register_plan(Plan("triton", ("cpu", "cuda"), kernel="triton", tuned_on=("cuda",),
                   description="the whole windowed softmax as Triton kernels (GPU)"))
