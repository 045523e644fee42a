"Output validation: the measures on hand-made answers, the blocklist file and its flag, and the report `evaluate_rows` adds."
import pytest
from hypothesis import given, settings, strategies as st

from qlora_nb.cli import eval_main, output_lines
from qlora_nb.metrics import distinct_n, is_degenerate, output_report, phrase_pattern, read_blocklist, repeated_ngram

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

answers = st.lists(st.lists(st.sampled_from(["the", "sea", "Sea", "!", "4", "  ", ",", "calm"]), max_size=12).map(" ".join), max_size=10)


@pytest.mark.parametrize("text, degenerate", [
    ("the the the the", True), ("THE, the. the the", True), ("!!!!!!", True), ("? ? ? ? ? ?", True), ("zzzzzzzz", True),
    ("", False), ("   ", False), ("4", False), ("yes", False), ("1000", False), ("the the the", False), ("!!!!!", False),
    ("the cat the cat", False), ("no no no no way", False),
])
def test_degenerate_means_one_unit_repeated(text, degenerate):
    assert is_degenerate(text) is degenerate


@pytest.mark.parametrize("text, loop", [
    ("to the sea to the sea to the sea", "to the sea"),
    ("I think. I think. I think. I think", "i think i"),  # case and punctuation aside; the loop's first 3 words
    ("to the sea to the sea", None),  # twice is not a loop
    ("a b c d e f g h i j k l", None),
    ("the sea, the sea, and the sea", None),  # "the sea" three times, but no three-word sequence repeats
])
def test_repetitive_means_a_looping_sequence(text, loop):
    assert repeated_ngram(text) == loop


def test_distinct_counts_words_and_pairs_over_all_answers():
    assert distinct_n(["a b c", "c b a"]) == 3 / 6
    assert distinct_n(["a b c", "c b a"], n=2) == 4 / 4  # (a b) (b c) (c b) (b a): pairs do not cross answers
    assert distinct_n(["", "  "]) == distinct_n([], n=2) == 0.0


@settings(max_examples=50, deadline=None)
@given(answers)
def test_every_share_is_a_share(texts):
    report = output_report(texts, blocklist=["sea"])
    assert report["count"] == len(texts)
    for key in ("empty", "degenerate", "repetitive", "blocked", "distinct_1", "distinct_2"): assert 0 <= report[key] <= 1, key
    assert report["blocked"] == sum(bool(phrase_pattern("sea").search(t)) for t in texts) / max(len(texts), 1)
    assert report["empty"] == sum(not t.strip() for t in texts) / max(len(texts), 1)


def test_blocklist_matches_whole_phrases_in_any_case():
    report = output_report(["A first-class answer.", "As an\nAI I refuse", "fine", "I am an AI assistant"], blocklist=["ass", "as an ai"])
    assert report["blocked"] == 0.25 and report["blocked_examples"] == [{"answer": 1, "phrase": "as an ai", "text": "As an\nAI I refuse"}]
    assert report["problems"] == ["1 answer(s) contain a blocked phrase, e.g. answer 1: 'as an ai' in 'As an\\nAI I refuse'"]


def test_thresholds_flag_only_what_passes_them():
    texts = ["fine answer"] * 18 + ["", "the the the the"]  # 5% empty and 5% degenerate: at the limits, not past them
    assert output_report(texts)["problems"] == []
    problems = output_report(texts, max_empty=0.01)["problems"]
    assert problems == ["5.0% of the answers are empty (more than 1%)"]


def test_blocklist_file(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text("# refusals\nAs an AI\n\n   \n  # indented comment\n  I cannot  \nhttp://\n", encoding="utf-8")
    assert read_blocklist(path) == ["As an AI", "I cannot", "http://"]
    (tmp_path / "comments.txt").write_text("# nothing yet\n")
    assert read_blocklist(tmp_path / "comments.txt") == []


def test_eval_refuses_a_missing_blocklist_before_loading_anything(tmp_path, capsys):
    assert eval_main([str(tmp_path / "no_run"), "--blocklist", str(tmp_path / "nowhere.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-nb eval: error: blocklist ") and "nowhere.txt does not exist" in err and "one phrase a line" in err
    (tmp_path / "blocklist.txt").write_text("as an AI\n")
    assert eval_main([str(tmp_path / "no_run"), "--blocklist", str(tmp_path / "blocklist.txt")]) == 2  # the file is fine: the run is not
    assert "holds no finished run" in capsys.readouterr().err


def test_output_lines_show_both_sides():
    before = output_report(["", "fine"])
    after = output_report(["fine", "also fine", "As an AI, no"], blocklist=["as an AI"])
    lines = output_lines({"outputs": before}, {"outputs": after})
    assert lines[0].startswith("outputs") and lines[0].endswith("(3 answers)")
    assert lines[1].split() == ["empty", "50.0%", "0.0%"] and lines[4].split() == ["blocked", "0.0%", "33.3%"]
    assert lines[-2:] == ["before: 50.0% of the answers are empty (more than 5%)", "after: " + after["problems"][0]]
    assert output_lines({"outputs": after}, {"outputs": before})[-1] == "after: " + before["problems"][0]
    assert output_lines({}, {"outputs": output_report(["fine"])})[-1] == "after: no problems"


@pytest.fixture(scope="module")
def tiny():
    from qlora_nb.core import set_seed
    from qlora_nb.models import load_base
    set_seed(0)
    return load_base("tiny", device="cpu", dtype="fp32")


def test_evaluate_rows_reports_the_answers_it_scored(tiny):
    from qlora_nb.data import load_examples
    from qlora_nb.metrics import evaluate_rows
    model, tokenizer = tiny
    prompted = load_examples("test")[:5]
    result = evaluate_rows(model, tokenizer, prompted + [{"text": "Plain notes with no prompt."}], max_new_tokens=3)
    assert result["outputs"]["count"] == result["n"] == len(prompted)
    assert result["outputs"] == output_report(result["predictions"])  # the scored answers, not a second generation
    with pytest.raises(ValueError, match="is blank"):
        evaluate_rows(None, tokenizer, prompted, blocklist=["ok", " "])  # before the model runs


def test_evaluate_model_passes_the_blocklist_through(tiny):
    from qlora_nb.data import load_examples
    from qlora_nb.recipe import evaluate_model
    from qlora_nb.settings import resolve_config
    model, tokenizer = tiny
    config = resolve_config(overrides={"model": "tiny", "quant": "none", "em_max_new_tokens": 3, "ppl_max_tokens": 0, "progress": False})
    rows = load_examples("test")[:4]
    plain = evaluate_model(model, tokenizer, config, rows)
    said = next(answer for _, answer in plain["examples"] if answer.split())  # the tiny model's own words
    blocked = evaluate_model(model, tokenizer, config, rows, blocklist=[said.split()[0]])
    assert plain["outputs"]["blocked"] == 0 and blocked["outputs"]["blocked"] > 0
    assert blocked["outputs"]["blocked_examples"][0]["phrase"] == said.split()[0]
    assert {k: v for k, v in blocked["outputs"].items() if not k.startswith("blocked") and k != "problems"} == \
           {k: v for k, v in plain["outputs"].items() if not k.startswith("blocked") and k != "problems"}
