"""Constants of the shard format (docs/shard-format.md) that the writer (rot_render) and the reader
(rot_train) must agree on; each side imports them from here instead of keeping its own copy."""

import torch

FORMAT = "rot-visual-embeddings/1"
STORED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
