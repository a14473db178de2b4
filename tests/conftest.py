"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is decided here,
before the tests import flashcontrast: without a CUDA device the Triton kernels run in the
interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is visible")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
