"A short Optuna study on the tiny model: QLoRA trials logged as run directories, a bad trial pruned, the study plotted."
import json
from pathlib import Path

import optuna
import pytest

from qlora_nb.runlog import LogTail, RunData, read_run_log
from qlora_nb.models import load_base
from qlora_nb.search import SEARCHABLE, check_space, run_search, search_data, search_figures, search_table, train_trial

SPACE = {"r": [4, 8], "alpha": [8, 16], "dropout": (0.0, 0.1), "lr": (1e-5, 3e-2, "log"),
         "target_modules": {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "all": "all-linear"}, "blocksize": [64, 128]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def study(tmp_path_factory, embedded_subset):
    "Three NF4 trials: a good learning rate, one far too small (pruned at its first eval), one from the sampler."
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tmp_path_factory.mktemp("search")
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    data = search_data(tokenizer, *embedded_subset(tmp, 48, 16))
    good = {"r": 8, "alpha": 16, "dropout": 0.0, "lr": 2e-2, "target_modules": "all", "blocksize": 64}
    bad = {**good, "lr": 1e-5, "blocksize": 128}
    return run_search(SPACE, tmp / "study", n_trials=3, data=data, quantize=True, max_steps=8, eval_steps=4, batch_size=8,
                      device="cpu", dtype="fp32", enqueue=[good, bad]), tmp / "study"


def test_states_and_pruning(study):
    study, folder = study
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE and states[1] == optuna.trial.TrialState.PRUNED, states
    assert study.trials[1].intermediate_values == {4: pytest.approx(study.trials[1].intermediate_values[4])}
    assert study.trials[1].intermediate_values[4] > study.trials[0].intermediate_values[4]  # pruned for a worse eval loss
    log = read_run_log(folder / "trial-0001" / "run.jsonl")
    assert [r["step"] for r in log if r["type"] == "eval"] == [4]
    assert log[-1]["event"] == "fit_end" and log[-1]["stop_reason"] == "pruned"
    assert not (folder / "trial-0001" / "adapter").exists()
    assert (folder / "trial-0000" / "adapter" / "adapter_config.json").is_file()


def test_trials_are_runs_the_dashboard_opens(study):
    study, folder = study
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        config = json.loads((run_dir / "config.json").read_text())
        assert config["quant"] == "nf4" and config["blocksize"] == trial.params["blocksize"] and config["lora_r"] == trial.params["r"]
        run = RunData(run_dir.name)
        for record in LogTail(run_dir).read()[0]: run.add(record)
        eval_steps, eval_losses = run.series["eval_loss"].points()
        assert eval_steps and eval_losses == [trial.intermediate_values[s] for s in eval_steps]
        assert run.meta["config"]["lr"] == pytest.approx(trial.params["lr"])


def test_plots_and_table(study):
    study, _ = study
    figures = search_figures(study)
    assert {"history", "intermediate"} <= set(figures)
    names = {trace.name: list(trace.x) for trace in figures["intermediate"].data}
    assert names["Trial0"] == [4, 8] and names["Trial1"] == [4]
    table = search_table(study)
    assert [r["trial"] for r in table] == [0, 1, 2] and table[1]["state"] == "PRUNED"


def test_empty_space_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the search space is empty"): run_search({}, tmp_path)
    with pytest.raises(ValueError, match="has no values"): check_space({"blocksize": []})
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_trial_records_the_config_it_ran(tmp_path, embedded_subset):
    "The max_length and data files in a trial's config.json are the ones its rows were made with."
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    train, val = embedded_subset(tmp_path, 16, 8)
    data = search_data(tokenizer, train, val, max_length=40)
    assert max(len(row["input_ids"]) for row in data.train) == 40  # some rows were cut: the length matters
    train_trial({**SEARCHABLE, "lr": 1e-2}, tmp_path / "run", data, quantize=False, max_steps=1, eval_steps=1, device="cpu", dtype="fp32")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["max_length"], config["data"], config["val"], config["eval_rows"]) == (40, str(train), str(val), 8)
    meta = read_run_log(tmp_path / "run" / "run.jsonl")[0]
    assert meta["config"] == config
