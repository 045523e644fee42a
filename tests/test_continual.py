"Continual learning on the tiny model: replay and EWC measurably forget less than naive sequential training on a toy case."
import random

import pytest
import torch
from datasets import Dataset

from qlora_nb.continual import ContinualConfig, loss_scorer, run_stages
from qlora_nb.methods import load_trainable_state, trainable_state
from qlora_nb.data import make_collator, tokenize_dataset
from qlora_nb.lora import LoRAConfig
from qlora_nb.methods import load_for_training

# two toy tasks with an obvious pattern each, told apart only by their instruction: a constant answer per task
TASKS = {"fruit": ("Name the fruit.", "apple"), "animal": ("Name the animal.", "horse")}
STAGES = [["fruit"], ["animal"]]
WORDS = "river stone candle orbit meadow falcon pepper thunder cotton lantern".split()
STEPS, LR, EWC_LAMBDA = 12, 2e-2, 1e4
# measured (stage 1's loss rise after stage 2): naive 1.90, replay 1.03 (0.54 of naive), EWC 1.31 (0.69 of naive)
BOUND = {"replay": 0.75, "ewc": 0.85}  # the largest share of naive's forgetting allowed, with a margin over the measured


def toy_rows(tokenizer, n:int, seed:int) -> list[dict]:
    "`n` tokenized rows per task: the task's instruction, three random words as input, its fixed answer."
    rng = random.Random(seed)
    rows = [{"instruction": instruction, "input": " ".join(rng.sample(WORDS, 3)), "output": answer, "task": task, "where": f"{task}:{i}"}
            for task, (instruction, answer) in TASKS.items() for i in range(n)]
    tokenized, _ = tokenize_dataset(Dataset.from_list(rows), tokenizer, max_length=48)
    return list(tokenized)


@pytest.fixture(scope="module")
def toy():
    "The tiny model with LoRA, the toy tasks' rows, and a scorer: minus the mean answer loss on each stage's held-out rows."
    torch.set_num_threads(1)
    model, tokenizer = load_for_training("tiny", method="lora", quantize=False, lora_config=LoRAConfig(r=4, alpha=8),
                                         dtype="fp32", device="cpu", seed=0)
    tokenizer.chat_template = None  # the plain template: short rows
    collate = make_collator(tokenizer)
    return model, toy_rows(tokenizer, 64, seed=0), collate, loss_scorer(STAGES, toy_rows(tokenizer, 16, seed=1), collate), trainable_state(model)


def run(toy, method, first_stage=None, **settings):
    model, train, collate, scorer, start = toy
    load_trainable_state(model, start)
    config = ContinualConfig(method=method, steps_per_stage=STEPS, batch_size=8, lr=LR, seed=0, **settings)
    return run_stages(model, STAGES, train, collate, scorer, config, first_stage=first_stage, device="cpu", dtype="fp32")


def test_replay_and_ewc_forget_less_than_naive(toy):
    # the scores are minus the held-out answer loss, so forgetting is the rise of stage 1's loss from its best
    naive = run(toy, "naive")
    assert naive.matrix[1][1] > naive.matrix[0][1] + 0.5, naive.matrix  # stage 2 is learned
    assert naive.average_forgetting > 0.5, naive.matrix  # and naive training on stage 2 undoes stage 1
    replay = run(toy, "replay", first_stage=naive, replay_share=0.25)
    ewc = run(toy, "ewc", first_stage=naive, ewc_lambda=EWC_LAMBDA)
    for result in (replay, ewc):
        assert result.matrix[0] == naive.matrix[0]  # the shared first stage
        assert result.average_forgetting < BOUND[result.method] * naive.average_forgetting, (result.method, result.matrix, naive.matrix)
        assert result.matrix[1][1] > naive.matrix[0][1] + 0.5, (result.method, result.matrix)  # stage 2 is still learned
