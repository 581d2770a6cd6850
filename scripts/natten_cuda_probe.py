"""Runs NATTEN's and the compiled flex neighbourhood attention once on CUDA and prints each full
traceback: a sweep row keeps one line of an error, a probe on a lent machine needs the whole of it."""

from __future__ import annotations

import traceback

import torch

from qna_bench.problem import Problem
from qna_bench.registry import get_layer


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return
    for name in ("na", "na_flex"):
        for mode in ("forward", "train"):
            problem = Problem(batch=2, height=28, width=28, channels=64, heads=4, window=7, mode=mode, device="cuda")
            print(f"--- {name} {mode}")
            try:
                spec = get_layer(name)
                module = spec.build(problem)
                print("flags:", spec.layer_flags(module, problem))
                x = problem.make_input(spec.layout)
                out = module(x)
                if mode == "train":
                    out.sum().backward()
                torch.cuda.synchronize()
                print("ok", tuple(out.shape))
            except Exception:  # noqa: BLE001 - the probe's job is to print whatever went wrong
                traceback.print_exc()


if __name__ == "__main__":
    main()
