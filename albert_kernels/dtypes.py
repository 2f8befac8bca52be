"""The floating-point dtypes the command-line tools, the case tables and training take by name."""
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
