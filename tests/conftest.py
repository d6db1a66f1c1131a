import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (naive.py, models.py) by name

# Without a GPU the Triton kernels run in Triton's interpreter. The variable must be set before anything
# (transformers included) imports triton, so it is set here, before test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
