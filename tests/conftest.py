"Shared test setup: never reach a model hub, and keep test artifacts in one place."
import os
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture
def artifacts_dir():
    "A folder kept after the run (screenshots, logs), under tests/artifacts."
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def one_thread():
    "One torch thread for a module: the tiny model's matrices are too small to gain from threads; restored afterwards."
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
