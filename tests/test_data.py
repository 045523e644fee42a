"""The data pipeline against files on disk: one fixture file per kind of bad input, the odd-but-fine inputs, the
embedded dataset (reproducible, correct answers, no leakage), the user-data fixtures of every format (held-out
splits, multi-turn labels, the data report on a dirty file) and SmolLM2's real tokenizer."""
import importlib.util, json, re
from pathlib import Path

import pytest
import torch

from qlora_nb.core import data_dir
from qlora_nb.data import DataError, format_prompt, load_data, load_examples, make_collator, split_example, tokenize_dataset
from qlora_nb.prepare import MIN_HELDOUT_ROWS, build_datasets, clean, hold_out
from qlora_nb.models import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    from qlora_nb.models import prepare_smollm2
    return AutoTokenizer.from_pretrained(prepare_smollm2())  # the converted embedded model; `make test` prepares it


# ---- bad input: a clear error naming the file and line, raised before any training ----------------------------
BAD = [  # fixture, line (or row), what the message must say
    ("malformed.jsonl", "3", "malformed JSON: Expecting ',' delimiter at column 41"),
    ("missing_field.jsonl", "2", "field 'output' is missing (the row has 'instruction', 'input')"),
    ("wrong_type.jsonl", "4", "field 'output' must be a string, got int 4"),
    ("not_utf8.jsonl", "2", "bytes b'\\xe9' at byte 25 of the line are not UTF-8"),
    ("not_an_object.jsonl", "2", "expected a JSON object, got list"),
    ("chat_last_user.jsonl", "2", "the last message must be the assistant's answer, got role 'user'"),
    ("short_row.csv", "3", "the row has fewer columns than the header (output missing)"),
    ("lone_surrogate.jsonl", "2", "field 'instruction' holds a lone surrogate '\\ud83d', which is not valid text"),
    ("malformed.json", "4", "malformed JSON: Expecting ',' delimiter"),
]

@pytest.mark.parametrize("name,line,message", BAD)
def test_bad_input_names_file_and_line(name, line, message):
    path = FIXTURES / name
    with pytest.raises(DataError) as error: load_data(path)
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)
    assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("name,line,message", [b for b in BAD if b[0] != "malformed.json"])  # a broken JSON list has no rows to skip to
def test_skip_bad_rows_skips_and_reports(name, line, message):
    path = FIXTURES / name
    ds, skipped = load_data(path, skip_bad_rows=True)
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}:{line}: ") and message in skipped[0]
    assert len(ds) >= 1 and f"{path}:{line}" not in ds["where"]


def test_bad_input_stops_build_before_training(tokenizer):
    with pytest.raises(DataError, match=re.escape(f"{FIXTURES / 'wrong_type.jsonl'}:4: field 'output' must be a string")):
        build_datasets(tokenizer, train=FIXTURES / "wrong_type.jsonl")
    dd = build_datasets(tokenizer, train=FIXTURES / "wrong_type.jsonl", skip_bad_rows=True)
    assert len(dd["train"]) == 3 and dd.data_report.splits["train"].bad_rows[0].startswith(f"{FIXTURES / 'wrong_type.jsonl'}:4:")


def test_empty_after_filtering_names_the_rows(tokenizer):
    path = FIXTURES / "empty_after_filter.jsonl"
    with pytest.raises(DataError) as error: build_datasets(tokenizer, train=path)
    assert "the dataset is empty after cleaning: all 3 rows were removed" in str(error.value)
    assert f"empty: removed 3 rows ({path}:1, {path}:2, {path}:3)" in str(error.value)


def test_template_that_drops_the_answer(tokenizer):
    template = (FIXTURES / "template_drops_answer.txt").read_text(encoding="utf-8")
    with pytest.raises(DataError, match=r"must contain \{output\} exactly once: without it the answer is dropped"):
        build_datasets(tokenizer, template=template)
    with pytest.raises(DataError, match=r"task_templates\['add_numbers'\]="):
        build_datasets(tokenizer, task_templates={"add_numbers": template})


def test_chat_template_that_drops_the_answer(tokenizer):
    row = load_examples(FIXTURES / "good_odd.jsonl")[0]
    dropping = tiny_tokenizer()
    dropping.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=re.escape(f"{FIXTURES / 'good_odd.jsonl'}:1: the chat template drops the answer")):
        split_example(dropping, row)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no data at .*nope.jsonl: .* a .jsonl, .json, .csv, .parquet, .txt file .* "
                                                r"in the instruction, completion, chat, sharegpt, text format"):
        load_data(FIXTURES / "nope.jsonl")
    (tmp_path / "data.tsv").write_text("instruction\toutput\na\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'.tsv' is not one of '.jsonl', '.json', '.csv', '.txt', '.parquet'"):
        load_data(tmp_path / "data.tsv")


# ---- inputs that are fine must pass -----------------------------------------------------------------------------
def test_odd_but_fine_input_is_accepted(tokenizer):
    path = FIXTURES / "good_odd.jsonl"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n\r\n" in path.read_bytes()  # the fixture is odd
    rows = load_examples(path)
    assert [r["where"] for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]  # blank lines skipped, lines counted
    assert rows[0] == dict(instruction="Echo 1.", input="", output="1", task="default", where=f"{path}:1")  # extra fields dropped
    assert rows[1]["input"] == "" and rows[2]["output"] == "café ✓"  # optional input missing; UTF-8 kept
    dd = build_datasets(tokenizer, train=path, val=path)
    assert len(dd["train"]) == 3 and dd.data_report.splits["train"].truncated == []


def test_cleaning_reports_each_step(tokenizer, tmp_path):
    path = tmp_path / "messy.jsonl"
    rows = [("Echo  1. ", "1"), ("Echo 1.", "1"), ("Echo 2.", ""), ("Echo 3. " * 40, "3"), ("Echo 4.", "4")]
    path.write_text("".join(json.dumps(dict(instruction=i, output=o)) + "\n" for i, o in rows), encoding="utf-8")
    ds, steps = clean(load_data(path)[0], tokenizer, max_length=40)
    assert ds["where"] == [f"{path}:1", f"{path}:5"]
    assert steps == [f"whitespace: changed 2 rows ({path}:1, {path}:4)", f"empty: removed 1 rows ({path}:3)",
                     f"duplicates: removed 1 rows ({path}:2)", f"length > 40 tokens: removed 1 rows ({path}:4)"]


# ---- the embedded dataset ---------------------------------------------------------------------------------------
def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", data_dir() / "make_data.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def test_embedded_data_is_reproducible_byte_for_byte():
    for name, text in _make_data().render().items():
        assert (data_dir() / name).read_bytes() == text.encode("utf-8"), f"{name} differs from what make_data.py writes"


CHECKS = {  # an independent check of each task's answer
    "km_to_m": lambda i, o: o == str(int(i.split()[0]) * 1000),
    "kg_to_g": lambda i, o: o == str(int(i.split()[0]) * 1000),
    "hours_to_minutes": lambda i, o: o == str(int(i.split()[0]) * 60),
    "uppercase": lambda i, o: o == i.upper(),
    "title_case": lambda i, o: o == i.title(),
    "reverse_words": lambda i, o: o.split() == i.split()[::-1],
    "sort_numbers": lambda i, o: o.split(", ") == [str(n) for n in sorted(map(int, i.split(", ")))],
    "join_commas": lambda i, o: o == ", ".join(i.split()),
    "weekday_after": lambda i, o: o == ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"][
        (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"].index(i.split()[-1]) + int(i.split()[0])) % 7],
    "month_after": lambda i, o: (["January", "February", "March", "April", "May", "June", "July", "August", "September",
                                  "October", "November", "December"].index(o) -
                                 ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                                  "October", "November", "December"].index(i.split()[-1]) - int(i.split()[0])) % 12 == 0,
    "first_letters": lambda i, o: o == "".join(w[0] for w in i.split()),
    "count_words": lambda i, o: o == str(len(i.split())),
    "last_word": lambda i, o: o == i.split()[-1],
    "add_numbers": lambda i, o: o == str(eval(i)),
    "subtract_numbers": lambda i, o: o == str(eval(i)),
}


def test_embedded_answers_are_right_and_splits_do_not_leak():
    splits = {name: load_examples(name) for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 3000, "val": 300, "test": 300}
    for name, rows in splits.items():
        assert set(r["task"] for r in rows) == set(CHECKS)
        wrong = [r["where"] for r in rows if not CHECKS[r["task"]](r["input"], r["output"])]
        assert wrong == [], wrong[:5]
    prompts = {name: {(r["instruction"], r["input"]) for r in rows} for name, rows in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"] and not prompts["val"] & prompts["test"]
    general = (data_dir() / "general.txt").read_text(encoding="utf-8")
    assert 30_000 < len(general.encode()) < 100_000


def test_embedded_data_with_smollm2_tokenizer(smollm2_tokenizer):
    dd = build_datasets(smollm2_tokenizer, test="test")
    report = dd.data_report
    assert report.validation.findings == [] and report.notes() == []
    assert all(s.truncated == [] and s.n_dropped() == 0 for s in report.splits.values())
    assert max(dd["train"]["length"]) < 100  # prompt + answer with the ChatML template and its system prompt
    row = load_examples("test")[0]
    prompt = format_prompt(smollm2_tokenizer, row)
    assert prompt.endswith(f"{row['input']}<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert dd["test"][0]["input_ids"][:len(prompt_ids)] == prompt_ids
    answer = [t for t, l in zip(dd["test"][0]["input_ids"], dd["test"][0]["labels"]) if l != -100]
    assert smollm2_tokenizer.decode(answer) == row["output"] + "<|im_end|>\n"


def test_collator_pads_dynamically(tokenizer):
    dd = build_datasets(tokenizer, val="test")
    rows = dd["train"].select(range(8)).to_list()
    batch = make_collator(tokenizer)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (8, longest)
    assert all(t.dtype == torch.int64 for t in batch.values())
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"] and batch["labels"][i, :n].tolist() == r["labels"]
        assert batch["attention_mask"][i].sum() == n and (batch["labels"][i, n:] == -100).all()


# ---- the user-data fixtures: every format, held out 10%/10% ------------------------------------------------------
def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def test_fixtures_are_reproducible_byte_for_byte():
    for name, text in _make_fixtures().render().items():
        assert (FIXTURES / name).read_bytes() == text.encode("utf-8"), f"{name} differs from what make_fixtures.py writes"


USER_FILES = [  # fixture, build_datasets options, the format its rows must come out in
    ("alpaca.jsonl", {}, "instruction"), ("chat.jsonl", {}, "chat"), ("sharegpt.json", {}, "chat"), ("notes.txt", {}, "text"),
    ("qa.csv", dict(fields={"instruction": "question", "output": "answer"}), "instruction"),
    ("dirty.jsonl", dict(skip_bad_rows=True), "instruction"),
]

@pytest.mark.parametrize("name,options,kind", USER_FILES)
def test_each_fixture_holds_out_val_and_test(tokenizer, name, options, kind):
    dd = build_datasets(tokenizer, train=FIXTURES / name, val=None, test_fraction=0.1, max_length=256, **options)
    splits = dd.data_report.splits
    assert list(splits) == ["train", "val", "test"] and splits["test"].source == f"{FIXTURES / name} (held out)"
    assert sum(s.read for s in splits.values()) >= 100 and all(s.read >= MIN_HELDOUT_ROWS for s in splits.values())
    assert len(dd.test_rows) == len(dd["test"]) >= MIN_HELDOUT_ROWS - 1  # dirty.jsonl may lose its empty row
    held = {r["where"] for r in dd.test_rows}
    assert all(r["where"].startswith(str(FIXTURES / name)) for r in dd.test_rows)
    row = dd.test_rows[0]
    assert {"chat": bool(row.get("messages")), "text": not row["instruction"] and not row.get("messages"),
            "instruction": bool(row["instruction"])}[kind], row
    again = build_datasets(tokenizer, train=FIXTURES / name, val=None, test_fraction=0.1, max_length=256, **options)
    assert {r["where"] for r in again.test_rows} == held  # seeded


def test_fixtures_have_tasks_and_multi_turn_rows():
    alpaca = load_examples(FIXTURES / "alpaca.jsonl")
    assert len({r["task"] for r in alpaca}) >= 3 and sum(bool(r["input"]) for r in alpaca) > 30
    chats = load_examples(FIXTURES / "chat.jsonl") + load_examples(FIXTURES / "sharegpt.json")
    multi = [r for r in chats if any(m["role"] == "assistant" for m in r["messages"])]
    assert 40 <= len(multi) < len(chats) and any(m["role"] == "system" for r in chats for m in r["messages"])
    notes = load_examples(FIXTURES / "notes.txt")
    assert len(notes) >= 80 and notes[1]["where"] == f"{FIXTURES / 'notes.txt'}:3" and "\n" in notes[1]["output"]


def test_every_assistant_turn_is_learned(tokenizer):
    row = next(r for r in load_examples(FIXTURES / "chat.jsonl") if len(r["messages"]) == 3)  # user, assistant, user
    plain = tiny_tokenizer(); plain.chat_template = None
    for tok in (tokenizer, plain):
        tokenized, _ = tokenize_dataset(load_data(FIXTURES / "chat.jsonl")[0].filter(lambda r: r["where"] == row["where"]), tok, max_length=512)
        learned = tok.decode([t for t, l in zip(tokenized[0]["input_ids"], tokenized[0]["labels"]) if l != -100])
        assert row["messages"][1]["content"] in learned and row["output"] in learned, learned
        assert row["messages"][0]["content"] not in learned and row["messages"][2]["content"] not in learned, learned
        prompt = format_prompt(tok, row)
        assert prompt.endswith("<|im_start|>assistant\n" if tok is tokenizer else "assistant: ") and row["output"] not in prompt
        assert row["messages"][1]["content"] in prompt  # the earlier answer is context for the last


def test_sharegpt_unknown_speaker(tmp_path):
    path = tmp_path / "talk.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "Hey"}]}]))
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: turn 1 is from 'assistant', which is not one of 'human', 'gpt', 'system'")):
        load_data(path)


def test_fields_mapping_names_missing_column():
    with pytest.raises(DataError) as error:
        load_data(FIXTURES / "qa.csv", fields={"instruction": "question", "output": "response"})
    assert str(error.value) == (f"{FIXTURES / 'qa.csv'}: fields maps 'output' to the column 'response', which the file does not "
                                "have; its columns are 'question', 'answer'")


def test_held_out_split_too_small_or_too_large(tokenizer):
    good_odd = FIXTURES / "good_odd.jsonl"
    with pytest.raises(DataError) as error: build_datasets(tokenizer, train=good_odd, val=None)
    assert str(error.value) == (f"val_fraction=0.1 would hold out 0 of the 3 rows of {good_odd}, fewer than "
                                "MIN_HELDOUT_ROWS=10, too few to measure anything; pass a validation file with val=...")
    with pytest.raises(DataError, match=r"test_fraction=0.05 would hold out 6 of the 120 rows of .*alpaca.jsonl, .* raise test_fraction to at least 0.09"):
        build_datasets(tokenizer, train=FIXTURES / "alpaca.jsonl", val=None, test_fraction=0.05)
    with pytest.raises(DataError, match=r"val_fraction=0.5 \+ test_fraction=0.6 = 1.1 must be below 1"):
        build_datasets(tokenizer, train=FIXTURES / "missing.jsonl", val=None, val_fraction=0.5, test_fraction=0.6)  # before reading
    rows = load_data(FIXTURES / "alpaca.jsonl")[0]
    parts = hold_out(rows, 0.1, 0.1, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [96, 12, 12]


def test_data_report_on_dirty_file(tokenizer):
    dirty, alpaca = FIXTURES / "dirty.jsonl", FIXTURES / "alpaca.jsonl"
    dd = build_datasets(tokenizer, train=dirty, val=alpaca, max_length=128, skip_bad_rows=True)
    report = json.loads(json.dumps(dd.data_report.to_dict()))
    train, val = report["splits"]["train"], report["splits"]["val"]
    at = lambda *lines: [f"{dirty}:{n}" for n in lines]
    assert (train["source"], train["read"], train["kept"]) == (str(dirty), 120, 114)
    assert {reason: d["first"] for reason, d in train["dropped"].items()} == {
        "bad row": at(5), "empty": at(25), "duplicate": at(12, 40, 60), "over length": [], "no answer left": at(30)}
    assert train["bad_rows"] == [f"{dirty}:5: malformed JSON: Expecting ',' delimiter at column 62"]
    assert train["duplicates"] == {"count": 3, "first": at(12, 40, 60)}
    assert train["truncated"] == {"count": 2, "first": at(30, 50)}
    assert train["tokens"]["max"] > 500 and train["tokens"]["min"] <= train["tokens"]["median"] <= train["tokens"]["p90"] <= train["tokens"]["p99"]
    assert (val["read"], val["kept"], val["overlap_with_train"]) == (120, 120, {"count": 2, "first": [f"{alpaca}:1", f"{alpaca}:2"]})
    assert all(d["count"] == 0 for d in val["dropped"].values()) and val["truncated"]["count"] == 0
    assert report["max_length"] == 128 and report["notes"] == dd.data_report.notes()
    notes = dd.data_report.notes()
    assert notes[0] == "train: 2 of 115 rows are longer than max_length=128 and were truncated (longest 873 tokens); raise max_length"
    assert f"val: 2 rows repeat a training prompt ({alpaca}:1, {alpaca}:2), so val scores overstate what the model learned" in notes
    table = dd.data_report.table().splitlines()
    assert table[0].split() == ["split", "read", "dropped", "duplicates", "truncated", "tokens", "median/p90/max"]
    assert table[1].split()[:5] == ["train", "120", "6", "3", "2"] and table[2].split()[:5] == ["val", "120", "0", "0", "0"]
    assert [line for line in table if line.startswith("note: ")] == [f"note: {n}" for n in notes[:6]] + (["note: 1 more in DataReport.notes()"] if len(notes) == 7 else [])
    dropped = build_datasets(tokenizer, train=dirty, val=alpaca, max_length=128, skip_bad_rows=True, drop_long=True).data_report.splits["train"]
    assert dropped.dropped["over length"] == at(30, 50) and dropped.truncated == []
