import os

import pytest
import torch

# Tests must be deterministic and light on the shared 2-core machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
