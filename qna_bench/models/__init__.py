"""Whole backbones for the model-level benchmark: QnA-ViT and its peers (Swin-T, ConvNeXt-T, NAT-Tiny).

Importing this package registers them in `qna_bench.registry` with ``kind="model"``.
"""

from qna_bench.models import entries  # noqa: F401
