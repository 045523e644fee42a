"The serving engine on the tiny model: mixed-adapter batches equal single requests, sampling, the loop, cancel, drain and errors."
import json, shutil, threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_nb.lora import load_adapter
from qlora_nb.models import load_base
from qlora_nb.quant_linear import quantize_model
from qlora_nb.serve.engine import Engine, SamplingParams, read_adapter
from qlora_nb.testing import fake_run

TEXTS = ["Hello", "Translate to French: good morning", "2 + 2 =", "Once upon a time there was a small",
         "Write a haiku about the sea", "Q: what is NF4?\nA:", "List three colours:"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_engine")
    return fake_run(tmp / "a", seed=1), fake_run(tmp / "b", seed=2, r=8)


@pytest.fixture(scope="module")
def engine(runs):
    torch.set_num_threads(1)
    return Engine("tiny", {"a": runs[0], "b": runs[1]}, max_batch=4)


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer(t)["input_ids"] for t in TEXTS]


def run_all(engine):
    while engine.step(): pass


def test_mixed_batch_equals_each_request_alone(engine, prompts):
    requests = [(prompts[i], ["tiny", "a", "b"][i % 3], SamplingParams(max_tokens=3 + 2 * i)) for i in range(len(prompts))]
    expected = [engine.generate(*r) for r in requests]
    assert len({tuple(e) for e in expected}) == len(requests)
    handles = [engine.submit(*r) for r in requests[:2]]
    engine.step()
    handles += [engine.submit(*r) for r in requests[2:5]]
    engine.step()
    assert (engine.stats["running"], engine.stats["waiting"]) == (4, 1)  # the last one waits for a free row (max_batch=4)
    engine.step()
    handles += [engine.submit(*r) for r in requests[5:]]
    run_all(engine)
    assert [h.token_ids for h in handles] == expected
    assert all(h.finish_reason == "length" and h.completion_tokens == len(h.token_ids) for h in handles)
    assert engine.stats["running"] == engine.stats["waiting"] == 0


def test_matches_transformers_generate_with_the_adapter_loaded(engine, runs, prompts):
    model, _ = load_base("tiny", dtype=torch.float32, device="cpu")
    load_adapter(quantize_model(model), runs[1] / "adapter").eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompts[3]]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert engine.generate(prompts[3], "b", SamplingParams(max_tokens=10, ignore_eos=True)) == out[0, len(prompts[3]):].tolist()


def test_seeded_sampling_repeats_alone_and_batched(engine, prompts):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    alone = engine.generate(prompts[1], "a", params)
    handles = [engine.submit(prompts[1], "a", params), engine.submit(prompts[0], "b", SamplingParams(max_tokens=10, temperature=1.0)),
               engine.submit(prompts[2], "tiny", SamplingParams(max_tokens=10))]
    run_all(engine)
    assert handles[0].token_ids == alone
    assert engine.generate(prompts[1], "a", SamplingParams(max_tokens=10, temperature=0.9, seed=4)) != alone
    greedy = engine.generate(prompts[1], "a", SamplingParams(max_tokens=10))
    assert engine.generate(prompts[1], "a", SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=5)) == greedy


def test_cancel_frees_the_slot_at_the_next_step(engine, prompts):
    handles = [engine.submit(prompts[i], "a", SamplingParams(max_tokens=40)) for i in range(5)]
    engine.step()
    assert (engine.stats["running"], engine.stats["waiting"]) == (4, 1)
    handles[1].cancel(); handles[4].cancel()
    engine.step()
    assert (engine.stats["running"], engine.stats["waiting"]) == (3, 0)
    assert handles[1].finish_reason == handles[4].finish_reason == "cancelled" and handles[4].token_ids == []
    engine.stop(drain=False)
    assert [h.finish_reason for h in handles] == ["cancelled"] * 5


def test_loop_streams_to_threads_and_drains_on_stop(engine, prompts):
    expected = [engine.generate(p, "b", SamplingParams(max_tokens=6)) for p in prompts]
    engine.start()
    results = {}
    def client(i): results[i] = list(engine.submit(prompts[i], "b", SamplingParams(max_tokens=6)))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads: t.start()
    for t in threads: t.join(timeout=60)
    late = [engine.submit(p, "b", SamplingParams(max_tokens=6)) for p in prompts]  # in flight when stop() is called
    engine.stop(drain=True, timeout=60)
    assert not engine._thread.is_alive()
    assert [results[i] for i in range(len(prompts))] == expected == [h.token_ids for h in late]
    assert all(h.finish_reason == "length" for h in late)


def test_stop_strings_end_the_text_before_them(engine, prompts):
    full = engine.generate(prompts[5], "a", SamplingParams(max_tokens=20))
    text = engine.tokenizer.decode(full)
    stop = text[len(text) // 2:][:2]
    handle = engine.submit(prompts[5], "a", SamplingParams(max_tokens=20, stop=[stop]))
    run_all(engine)
    assert handle.finish_reason == "stop" and stop not in handle.text() and text.startswith(handle.text())
    handle = engine.submit(prompts[5], "a", SamplingParams(max_tokens=20, stop=[stop]))
    run_all(engine)
    assert "".join(handle.text_deltas()) == handle.text()


def test_bad_requests_are_refused_at_submit(engine, prompts):
    with pytest.raises(KeyError, match=r"the models are \['tiny', 'a', 'b'\]"): engine.submit(prompts[0], "nope")
    with pytest.raises(ValueError, match="the context holds 512"): engine.submit([5] * 512, "a")
    with pytest.raises(ValueError, match="outside the vocabulary"): engine.submit([-1], "a")
    with pytest.raises(ValueError, match="empty"): engine.submit([], "a")
    with pytest.raises(ValueError, match="max_tokens"): SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"): SamplingParams(top_p=0)


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine, prompts):
    expected = engine.generate(prompts[0], "a", SamplingParams(max_tokens=4))
    layer = engine.model.model.layers[1].mlp.up_proj
    layer.forward = lambda x: 1 / 0
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="ZeroDivisionError"): list(engine.submit(prompts[0], "a", SamplingParams(max_tokens=4)))
    finally: del layer.forward
    assert list(engine.submit(prompts[0], "a", SamplingParams(max_tokens=4))) == expected
    engine.stop(timeout=60)


def test_the_context_limit_ends_a_sequence(runs):
    small = Engine("tiny", {"a": runs[0]}, max_batch=1, max_len=16)
    handle = small.submit(list(range(10, 22)), "a", SamplingParams(max_tokens=10, ignore_eos=True))
    run_all(small)
    assert (handle.finish_reason, len(handle.token_ids)) == ("length", 4)
    with pytest.raises(ValueError, match="the prompt has 16 tokens; the context holds 16"): small.submit(list(range(16)), "a")
    steps = small.stats["steps"]
    handles = [small.submit([5, 6, 7], "a", SamplingParams(max_tokens=3)) for _ in range(3)]  # one at a time, no idle step between
    run_all(small)
    assert all(h.finish_reason == "length" for h in handles) and small.stats["steps"] - steps == 3 * 3 + 1


def test_a_prefill_budget_spreads_a_burst_over_steps_oldest_first(engine, runs, prompts):
    "Seven requests at once with room for all: each step prefills as many of the oldest as the budget holds, outputs unchanged."
    expected = [engine.generate(p, "a", SamplingParams(max_tokens=5)) for p in prompts]
    budget = max(len(p) for p in prompts)
    budgeted = Engine("tiny", {"a": runs[0]}, max_batch=8, prefill_tokens=budget)
    steps = []
    budgeted.on_step = steps.append
    handles = [budgeted.submit(p, "a", SamplingParams(max_tokens=5)) for p in prompts]
    run_all(budgeted)
    assert [h.token_ids for h in handles] == expected
    admitted = [step["prefilled"] for step in steps if step["prefilled"]]
    assert sum(admitted) == len(prompts) and len(admitted) > 1 and budgeted.stats["prompt_tokens"] == sum(map(len, prompts))
    first = 0
    for count in admitted:  # within the budget, and no fewer than fit
        assert sum(map(len, prompts[first:first + count])) <= budget
        assert first + count == len(prompts) or sum(map(len, prompts[first:first + count + 1])) > budget
        first += count
    first_tokens = [h.first_token_time for h in handles]
    assert first_tokens == sorted(first_tokens)
    with pytest.raises(ValueError, match=r"prefill_tokens=0 is out of range: allowed \[1, inf\)"): Engine("tiny", {}, prefill_tokens=0)
    with pytest.raises(ValueError, match="prefill_tokens='64' must be an int >= 1, or None"): Engine("tiny", {}, prefill_tokens="64")


@pytest.fixture(scope="module")
def base():
    model, _ = load_base("tiny", dtype=torch.float32, device="cpu")
    return quantize_model(model)


def broken_copy(tmp_path, run, change):
    "A copy of the run's adapter folder with its tensors passed through `change`."
    folder = tmp_path / "adapter"
    shutil.copytree(run / "adapter", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(change(tensors), folder / "adapter_model.safetensors")
    return folder


def test_adapters_are_checked_against_the_model(tmp_path, runs, base):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong = broken_copy(tmp_path / "1", runs[0], lambda t: {**t, key: torch.zeros(4, 64)})
    with pytest.raises(ValueError, match=r"adapter 'w': tensor .*q_proj.lora_A.weight' has shape \(4, 64\); .* needs \(4, 128\)"):
        read_adapter("w", wrong, base)
    unknown = broken_copy(tmp_path / "2", runs[0], lambda t: {**t, "base_model.model.model.norm.lora_A.weight": torch.zeros(4, 128)})
    with pytest.raises(ValueError, match="adapter 'u': tensor 'base_model.model.model.norm.lora_A.weight' is not"): read_adapter("u", unknown, base)
    missing = broken_copy(tmp_path / "3", runs[0], lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match="adapter 'm': 1 LoRA tensors are missing"): read_adapter("m", missing, base)
    dora = tmp_path / "4"
    shutil.copytree(runs[0] / "adapter", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="adapter 'd': use_dora=True"): read_adapter("d", dora, base)


def test_adapters_with_other_bases_or_quantization_are_refused(tmp_path, runs):
    other = tmp_path / "run"
    shutil.copytree(runs[0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "blocksize": 128}))
    with pytest.raises(ValueError, match="quantize the base differently"): Engine("tiny", {"a": runs[0], "o": other})
    with pytest.raises(ValueError, match="trained on model='tiny'"): Engine("smollm2-135m", {"a": runs[0]})
    with pytest.raises(ValueError, match="other than the base"): Engine("tiny", {"tiny": runs[0]})
