"""Peer layers, one module per family, each wrapping its own library and registering itself."""

import baselines.convnext  # noqa: F401
import baselines.flex_na  # noqa: F401
import baselines.global_attn  # noqa: F401
import baselines.halo  # noqa: F401
import baselines.natten  # noqa: F401
import baselines.sasa  # noqa: F401
import baselines.swin  # noqa: F401
import baselines.torch_na  # noqa: F401
from baselines import conv  # noqa: F401
