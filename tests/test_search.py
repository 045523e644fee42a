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


# --- the study in a database: workers, resume, extend, dead workers, the command line

QUICK = """model: tiny
quant: none
data: {train}
val: {val}
test: null
max_length: 32
batch_size: 4
max_steps: 2
warmup_steps: 0
eval_steps: 2
save_steps: null
em_examples: 0
ppl_max_tokens: 0
device: cpu
dtype: fp32
search:
  space:
    lora_r: [2, 4, 8]
    lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
  trials: 3
"""


@pytest.fixture
def quick_config(tmp_path, embedded_subset):
    "A search config whose trials train 2 steps of the tiny model on 16 rows."
    train, val = embedded_subset(tmp_path, 16, 8)
    path = tmp_path / "quick.yaml"
    path.write_text(QUICK.format(train=train, val=val))
    return path


def finished_trials(study):
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def check_runs_written_once(study, folder):
    "Each trial that ran has its own run directory, written by one fit; no directory belongs to no trial."
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert all(t.state != optuna.trial.TrialState.FAIL for t in ran), [(t.number, t.state) for t in ran]
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{t.number:04d}" for t in ran]
    for trial in ran:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert json.loads((run_dir / "trial.json").read_text())["number"] == trial.number
        log = read_run_log(run_dir / "run.jsonl")
        assert [r["type"] for r in log].count("meta") == 1 and sum(r.get("event") == "fit_end" for r in log) == 1
        assert json.loads((run_dir / "config.json").read_text())["lr"] == pytest.approx(trial.params["lr"])


def test_two_workers_share_one_sqlite_study_then_workers_extend_it(quick_config, tmp_path):
    "Two processes on one study.db run exactly 4 trials between them; --workers 2 then extends the study to 6."
    import os, subprocess, sys
    from qlora_nb.search import default_storage, search_main
    folder = tmp_path / "search"
    command = [sys.executable, "-m", "qlora_nb.search", str(quick_config), "--trials", "4", "--out", str(folder)]
    workers = [subprocess.Popen([*command, "--sampler-seed", str(seed)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert all("best trial" in out and "study: 'quick' in sqlite:///" in out for out, _ in outputs), outputs
    study = optuna.load_study(study_name="quick", storage=default_storage(folder))
    finished = finished_trials(study)
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    check_runs_written_once(study, folder)

    before = {t.number: (t.state, t.value, t.params) for t in finished}
    assert search_main([str(quick_config), "--trials", "6", "--workers", "2", "--out", str(folder)]) == 0
    study = optuna.load_study(study_name="quick", storage=default_storage(folder))
    assert len(finished_trials(study)) == 6
    assert {t.number: (t.state, t.value, t.params) for t in finished_trials(study) if t.number in before} == before  # not rerun
    check_runs_written_once(study, folder)


def test_a_dead_workers_trial_is_failed_and_rerun(quick_config, tmp_path):
    "A trial left RUNNING by a killed worker is marked FAIL once its heartbeats stop, and runs again with its parameters."
    import time
    from qlora_nb.search import default_storage, load_search_file, open_storage, open_study
    spec, folder = load_search_file(quick_config), tmp_path / "search"
    folder.mkdir()
    storage = open_storage(default_storage(folder), heartbeat=0.3)
    study = open_study(storage, "dead", spec.space)
    dead = study.ask()
    dead.suggest_categorical("r", [2, 4, 8]); dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("dead"), dead.number))
    time.sleep(1.2)  # more than three heartbeats missed
    study = run_search(spec.space, folder, n_trials=2, study_name="dead", storage=storage, settings=spec.settings)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL and len(finished_trials(study)) == 2
    retry = next(t for t in study.trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == study.trials[0].params
    assert (Path(retry.user_attrs["run_dir"]) / "adapter" / "adapter_config.json").is_file()


def test_a_bad_config_exits_2_before_any_training(quick_config, tmp_path, capsys):
    from qlora_nb.search import search_main
    text = quick_config.read_text()
    bad = tmp_path / "bad.yaml"
    for edit, message in [(("max_length: 32", "max_lenght: 32"), "bad.yaml:6: unknown key 'max_lenght'"),
                          (("lora_r: [2, 4, 8]", "lora_r: [2, four]"), "bad.yaml:18: lora_r='four' is not allowed"),
                          (("trials: 3", "trials: 0"), "bad.yaml:20: search.trials=0 is not allowed")]:
        bad.write_text(text.replace(*edit))
        assert search_main([str(bad), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qlora-nb search: error: ") and message in err and err.count("\n") == 1, err
    assert search_main([str(quick_config), "--storage", "nosuchdb://x", "--out", str(tmp_path / "never")]) == 2
    assert "storage='nosuchdb://x' cannot be opened" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # nothing was started


def test_the_example_config_is_valid():
    from qlora_nb.search import load_search_file, search_parser
    spec = load_search_file(Path(__file__).resolve().parent.parent / "configs" / "search.yaml")
    assert spec.space == {"r": [4, 8, 16], "lr": (1e-4, 3e-2, "log")} and spec.settings["model"] == "tiny"
    assert "configs/search.yaml" in search_parser().format_help()
