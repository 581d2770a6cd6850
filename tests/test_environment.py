"""What a run records about the machine it measured on."""

from __future__ import annotations

import torch

from qna_bench.environment import cpu_capability, cpu_model, read_environment


def test_a_cpu_device_name_carries_the_model_and_the_instruction_set_its_kernels_use():
    env = read_environment("cpu")
    assert cpu_capability() == torch.backends.cpu.get_cpu_capability() != ""
    assert env.device_name == f"cpu: {cpu_model()} ({cpu_capability()})"
    assert env.cpu_model == cpu_model()
