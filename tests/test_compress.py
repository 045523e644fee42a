"Distillation loss properties and magnitude pruning on the tiny model."

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from qlora_nb.compress import Distiller, distillation_loss, magnitude_prune, prunable_linears, sparsity_of
from qlora_nb.models import load_base


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.5, 8.0), st.floats(0.0, 1.0))
def test_distillation_loss_is_masked_kl_plus_ce(seed, temperature, alpha):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)  # (B, T, V)
    labels = torch.randint(0, 7, (2, 5), generator=generator); labels[1, :2] = -100
    mask = labels[:, 1:] != -100
    log_s, log_t = F.log_softmax(student[:, :-1] / temperature, -1)[mask], F.log_softmax(teacher[:, :-1] / temperature, -1)[mask]
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student[:, :-1][mask], labels[:, 1:][mask])
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    assert float(distillation_loss(student, teacher, labels, temperature, alpha)) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert float(distillation_loss(teacher, teacher, labels, temperature, 1.0)) == pytest.approx(0.0, abs=1e-5)


def test_distiller_trains_only_the_student():
    teacher, _ = load_base("tiny", device="cpu", dtype="fp32", seed=1)
    student, _ = load_base("tiny", device="cpu", dtype="fp32", seed=0)
    distiller = Distiller(student, teacher, temperature=2.0).train()
    assert not distiller.teacher.training
    ids = torch.randint(0, 2000, (2, 8))
    distiller(ids, torch.ones_like(ids)).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.8])
def test_global_magnitude_pruning(sparsity):
    model, _ = load_base("tiny", device="cpu", dtype="fp32")
    before = {n: m.weight.clone() for n, m in prunable_linears(model)}
    embeddings = model.get_input_embeddings().weight.clone()
    assert magnitude_prune(model, sparsity) == pytest.approx(sparsity, abs=1e-3)
    assert sparsity_of(model) == pytest.approx(sparsity, abs=1e-3)
    if sparsity:
        kept = torch.cat([m.weight[m.weight != 0].abs() for _, m in prunable_linears(model)])
        dropped = torch.cat([before[n][m.weight == 0].abs() for n, m in prunable_linears(model)])
        assert dropped.max() <= kept.min()
    for n, m in prunable_linears(model):  # kept weights are unchanged
        assert torch.equal(m.weight[m.weight != 0], before[n][m.weight != 0])
    assert torch.equal(model.get_input_embeddings().weight, embeddings)


def test_bad_sparsity_and_scope():
    model, _ = load_base("tiny", device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match=r"sparsity=1.5 is out of range: allowed \[0, 1\)"): magnitude_prune(model, 1.5)
    with pytest.raises(ValueError, match="scope='row' is not one of 'global', 'layer'"): magnitude_prune(model, 0.1, scope="row")
