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


@pytest.fixture(scope="module")
def ids():
    "A fixed (B=2, T=16) batch of token ids inside the tiny model's vocabulary."
    import torch
    from qlora_nb.core import set_seed
    set_seed(1)
    return torch.randint(0, 2000, (2, 16))  # (B, T)


@pytest.fixture(scope="module")
def embedded_subset():
    "A function writing the first `n_train` and next `n_val` embedded training rows as train.jsonl and val.jsonl."
    import json
    from qlora_nb.data import load_examples

    def write(folder, n_train, n_val):
        rows = [{k: r[k] for k in ("instruction", "input", "output", "task")} for r in load_examples("train")[:n_train + n_val]]
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:n_train]))
        (folder / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[n_train:]))
        return folder / "train.jsonl", folder / "val.jsonl"
    return write
