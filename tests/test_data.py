"""The data pipeline against files on disk: one fixture file per kind of bad input, the odd-but-fine inputs, the
embedded dataset (reproducible, correct answers, no leakage) and SmolLM2's real tokenizer."""
import importlib.util, json, re
from pathlib import Path

import pytest
import torch

from qlora_nb.core import data_dir
from qlora_nb.data import DataError, format_prompt, load_data, load_examples, make_collator, split_example
from qlora_nb.prepare import build_datasets, clean
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
    assert len(dd["train"]) == 3 and dd.data_report.skipped["train"][0].startswith(f"{FIXTURES / 'wrong_type.jsonl'}:4:")


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


def test_missing_file_and_unknown_type():
    with pytest.raises(FileNotFoundError, match="no data at .*nope.jsonl"): load_data(FIXTURES / "nope.jsonl")
    with pytest.raises(ValueError, match=r"'.txt' is not one of '.jsonl', '.json', '.csv'"):
        load_data(FIXTURES / "template_drops_answer.txt")


# ---- inputs that are fine must pass -----------------------------------------------------------------------------
def test_odd_but_fine_input_is_accepted(tokenizer):
    path = FIXTURES / "good_odd.jsonl"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n\r\n" in path.read_bytes()  # the fixture is odd
    rows = load_examples(path)
    assert [r["where"] for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]  # blank lines skipped, lines counted
    assert rows[0] == dict(instruction="Echo 1.", input="", output="1", task="default", where=f"{path}:1")  # extra fields dropped
    assert rows[1]["input"] == "" and rows[2]["output"] == "café ✓"  # optional input missing; UTF-8 kept
    dd = build_datasets(tokenizer, train=path, val=path)
    assert len(dd["train"]) == 3 and dd.data_report.tokenization["train"]["truncated"] == 0


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
    assert report.validation.findings == []
    assert all(report.tokenization[s]["truncated"] == 0 for s in ("train", "val", "test"))
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
