"""Test-session set-up shared by every test module.

Without CUDA, Triton kernels run under the interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when a
kernel is *defined*, so it must be set before any module that defines kernels is imported — i.e. here,
before collection, not inside one test module (another module may import codegen first).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on two cores: one torch thread each, not two competing pairs
    torch.set_num_threads(1)
