"Metrics by task type against the reference libraries, the no-reference error, and the playground driven from code."
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlora_nb.core import set_seed
from qlora_nb.data import load_examples
from qlora_nb.lora import LoRAConfig, add_lora, lora_disabled
from qlora_nb.metrics import (DecodingConfig, Playground, TASK_TYPES, compare, evaluate_exact_match, exact_match, generate_answers,
                              score, score_rows)
from qlora_nb.models import load_base

words = st.lists(st.sampled_from(["red", "blue", "sky", "tiger", "orange", "7", "42"]), min_size=1, max_size=6).map(" ".join)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(words, words), min_size=1, max_size=8))
def test_scores_match_the_reference_libraries(pairs):
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU
    predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
    result = score(predictions, references, TASK_TYPES["text"])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert result["rougeL"] == pytest.approx(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs))
    assert result["bleu"] == pytest.approx(BLEU(effective_order=True).corpus_score(predictions, [references]).score / 100)
    assert result["exact_match"] == sum(p == r for p, r in pairs) / len(pairs)
    assert all(0 <= v <= 1 + 1e-9 for v in result.values())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(words, words, st.sampled_from(["add_numbers", "uppercase", "weekday_after"])), min_size=1, max_size=8))
def test_one_exact_match_everywhere(triples):
    "score_rows' overall, score's exact_match and exact_match are the same number: one normalization, one comparison."
    rows = [{"output": r, "task": task, "where": f"t:{i}"} for i, (_, r, task) in enumerate(triples)]
    predictions = [" " + p.replace(" ", "  ") + "\n" for p, _, _ in triples]  # whitespace does not count
    overall = exact_match(predictions, rows)["overall"]
    assert score_rows(rows, predictions)["overall"]["exact_match"] == overall
    assert score(predictions, [r["output"] for r in rows])["exact_match"] == pytest.approx(overall)
    assert overall == sum(p == r for p, r, _ in triples) / len(triples)

def test_classification_f1_punishes_a_constant_answer():
    references = ["Monday", "Tuesday", "Friday", "Monday"]
    constant = score(["Monday"] * 4, references, ["accuracy", "f1"])
    assert constant["accuracy"] == 0.5 and constant["f1"] < 0.3
    assert score(references, references, ["accuracy", "f1"]) == {"accuracy": 1.0, "f1": 1.0}


@pytest.mark.parametrize("metric", ["exact_match", "accuracy", "f1", "rouge1", "rougeL", "bleu"])
def test_a_metric_without_references_is_an_error(metric):
    with pytest.raises(ValueError, match=f"metric '{metric}' on task 'summaries' needs reference answers"):
        score(["some text"], None, [metric], task="summaries")
    with pytest.raises(ValueError, match="data.jsonl:2 has none"):
        score(["a", "b"], ["a", None], [metric], task="summaries", where=["data.jsonl:1", "data.jsonl:2"])


@pytest.fixture(scope="module")
def tuned():
    set_seed(0)
    model, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    add_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name: param.normal_(0, 0.5)
    return model, tokenizer


def test_playground_side_by_side(tuned):
    model, tokenizer = tuned
    decoding = DecodingConfig(max_new_tokens=5, batch_size=1)
    row = load_examples("test")[0]
    playground = Playground(model, tokenizer, decoding=decoding)
    playground.prompt.value, playground.input.value = row["instruction"], row["input"]
    playground.button.click()
    expected_tuned = generate_answers(model, tokenizer, [row], **asdict(decoding))[0]
    with lora_disabled(model): expected_base = generate_answers(model, tokenizer, [row], **asdict(decoding))[0]
    assert (playground.tuned_output.value, playground.base_output.value) == (expected_tuned, expected_base)
    assert expected_tuned != expected_base and playground.status.value == "done"


def test_compare_scores_both_models(tuned):
    model, tokenizer = tuned
    rows = load_examples("test")[:6]
    comparison = compare(model, tokenizer, rows, decoding=DecodingConfig(max_new_tokens=3), forgetting_max_tokens=128)
    assert comparison.tuned == score_rows(rows, comparison.predictions["tuned"])
    assert comparison.base == score_rows(rows, comparison.predictions["base"])
    assert comparison.forgetting["ratio"] == pytest.approx(comparison.forgetting["ppl_after"] / comparison.forgetting["ppl_before"])


def test_evaluate_exact_match_reports_its_answers(tuned):
    model, tokenizer = tuned
    rows = load_examples("test")[:4]
    result = evaluate_exact_match(model, tokenizer, rows, max_new_tokens=3, batch_size=2)
    assert result["predictions"] == generate_answers(model, tokenizer, rows, **asdict(DecodingConfig(max_new_tokens=3, batch_size=4)))
    assert result["n"] == 4 and set(result["per_task"]) == {r["task"] for r in rows}


def test_evaluate_rows_scores_each_kind_of_row(tuned, capsys):
    "Prompt rows by generation with their task's metrics, plain text by perplexity; with bars named by stage."
    from qlora_nb.metrics import evaluate_rows, main_metric, perplexity
    model, tokenizer = tuned
    rows = [dict(r, task="my_labels") for r in load_examples("test")[:3]] + load_examples("test")[3:5]
    texts = ["Plain notes to continue, with no prompt at all.", "A second paragraph of the same notes."]
    result = evaluate_rows(model, tokenizer, rows + [{"text": t} for t in texts], max_new_tokens=3,
                           task_types={"my_labels": "classification"}, progress=True)
    assert result["main_metric"]["my_labels"] == main_metric("my_labels", {"my_labels": "classification"}) == "accuracy"
    assert set(result["metrics"]["my_labels"]) == {"accuracy", "f1"}
    assert result["per_task"] == {task: result["metrics"][task][name] for task, name in result["main_metric"].items()}
    assert (result["n"], result["n_text"], len(result["predictions"])) == (5, 2, 5)
    assert result["heldout_perplexity"] == pytest.approx(perplexity(model, tokenizer, "\n\n".join(texts)))
    assert "perplexity" in capsys.readouterr().err  # the bars went to stderr


def test_evaluate_rows_checks_before_generating(tuned):
    from qlora_nb.metrics import evaluate_rows
    _, tokenizer = tuned
    rows = [dict(load_examples("test")[0], output=" ", where="mine.jsonl:3")]
    with pytest.raises(ValueError, match="mine.jsonl:3 has none"):
        evaluate_rows(None, tokenizer, rows)  # no model needed: it fails before generation
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_rows(None, tokenizer, [])
