"""Is QnA's tuner right? With an empty plan cache, let QnA choose its plan for a key, then time every
forced plan of that key at leisure (each warmed, then interleaved rounds of whole-layer calls, with both
GEMM forms of its projections) and print the chosen plan's median against the best one's.

    .venv/bin/python scripts/tuner_check.py [--windows 7 13] [--rounds 7] [--batch 8 --size 56]

Run it on a quiet machine: the tuner's choice is itself a measurement. Prints one line per key and ends
with the worst chosen/best ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def whole_layer_call(module, x: torch.Tensor, train: bool):
    if not train:
        def call() -> None:
            with torch.inference_mode():
                module(x)
        return call
    upstream = []

    def call() -> None:
        leaf = x.detach().requires_grad_()
        out = module(leaf)
        if not upstream:
            upstream.append(torch.randn_like(out))
        out.backward(upstream[0])
        for p in module.parameters():
            p.grad = None
    return call


def leisurely_medians(calls: dict[str, object], rounds: int, block_s: float = 0.3) -> dict[str, float]:
    """Each call warmed three times, then ``rounds`` interleaved rounds of blocks of ``block_s`` seconds."""
    per_call = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        start = time.perf_counter()
        call()
        per_call[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            n = max(1, round(block_s / per_call[name]))
            start = time.perf_counter()
            for _ in range(n):
                calls[name]()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[7, 13])
    parser.add_argument("--modes", nargs="+", default=["forward", "train"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    os.environ["QNA_BENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="qna_tuner_check_")  # an empty cache
    from qna_bench.qna import QnA
    from qna_bench.qna.tuning import ordered_candidates

    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, B={args.batch}, {args.size}², C={args.channels}, {args.heads} heads, "
          f"cache {os.environ['QNA_BENCH_CACHE_DIR']}")
    worst = 0.0
    for window in args.windows:
        for mode in args.modes:
            train = mode == "train"
            x = torch.randn(args.batch, args.size, args.size, args.channels)
            chooser = QnA(args.channels, args.channels, args.heads, window=window)
            choice = chooser.choose_plan(x, train)
            chosen = f"{choice.plan.name}+{choice.plan.projections}"
            calls = {}
            for plan in ordered_candidates(x.device, window, 1, train):
                for projections in ("linear", "conv1x1"):
                    module = QnA(args.channels, args.channels, args.heads, window=window, plan=plan.name,
                                 projections=projections)
                    module.load_state_dict(chooser.state_dict())
                    module.train(train)
                    calls[f"{plan.name}+{projections}"] = whole_layer_call(module, x, train)
            medians = leisurely_medians(calls, args.rounds)
            best = min(medians, key=medians.get)
            ratio = medians[chosen] / medians[best]
            worst = max(worst, ratio)
            print(f"k={window} {mode}: tuner chose {chosen} ({choice.tune_seconds:.1f} s of tuning) "
                  f"{medians[chosen] * 1e3:.2f} ms; best forced {best} {medians[best] * 1e3:.2f} ms; "
                  f"chosen/best {ratio:.3f}")
            ranked = sorted(medians.items(), key=lambda kv: kv[1])
            print("   " + ", ".join(f"{name} {t * 1e3:.1f}" for name, t in ranked))
    print(f"worst chosen/best: {worst:.3f}")


if __name__ == "__main__":
    main()
