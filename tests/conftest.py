"""Test setup. Without a GPU, Triton kernels run under the Triton interpreter: the variable has to
be set before triton is first imported, which is why it is done here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)
