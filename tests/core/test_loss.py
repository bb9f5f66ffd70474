"""Every loss variant against F.cross_entropy on full logits, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PlainFusedCE

from sftlab.core.loss import IGNORE, count_sequences, sft_loss


def _setup(seed=0, B=3, S=9, H=8, V=17):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = IGNORE
    if B > 2:
        labels[1, 5:] = IGNORE
        labels[2, ::2] = IGNORE
    return hidden, head, labels


def _full_ce(hidden, head, labels, smoothing=0.0):
    logits = head(hidden)[:, :-1]
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                           reduction="none", label_smoothing=smoothing).view(target.shape), target != IGNORE


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [2, 1000])
def test_token_loss_and_grad_match_full_logits(smoothing, chunk):
    hidden, head, labels = _setup()
    ours = sft_loss(hidden, head, labels, label_smoothing=smoothing, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, [hidden, head.weight])
    ce, mask = _full_ce(hidden, head, labels, smoothing)
    ref = ce[mask].mean()
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("chunk,budget,head_calls", [
    (1000, 2**20, 1),  # one small chunk: kept, the head runs once
    (1000, 8, 2),  # one chunk over the byte budget: recomputed in backward
    (2, 2**20, 2 * 7),  # several chunks (13 trained positions, 2 rows each): every chunk recomputed
])
def test_small_single_chunks_are_kept_others_recomputed(monkeypatch, chunk, budget, head_calls):
    import sftlab.core.loss as loss

    monkeypatch.setattr(loss, "NO_RECOMPUTE_BYTES", budget)
    hidden, head, labels = _setup()
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    ours = sft_loss(hidden, head, labels, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, [hidden, head.weight])
    assert len(calls) == head_calls
    ce, mask = _full_ce(hidden, head, labels)
    assert int(mask.sum()) == 13
    g_ref = torch.autograd.grad(ce[mask].mean(), [hidden, head.weight])
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_token_loss_divides_by_the_steps_token_count():
    hidden, head, labels = _setup()
    ce, mask = _full_ce(hidden, head, labels)
    assert torch.allclose(sft_loss(hidden, head, labels, num_items=100), ce[mask].sum() / 100, atol=1e-6)


def test_sequence_loss_is_mean_of_per_sequence_means():
    hidden, head, labels = _setup()
    ce, mask = _full_ce(hidden, head, labels)
    per_seq = torch.stack([ce[b][mask[b]].mean() for b in range(3)])
    ours = sft_loss(hidden, head, labels, mode="sequence")
    assert torch.allclose(ours, per_seq.mean(), atol=1e-6)


def test_sequence_loss_splits_packed_rows_by_position_ids():
    hidden, head, labels = _setup(B=1, S=10)
    labels[0] = torch.arange(10) % 17
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    labels[0, 4] = IGNORE  # first label of each packed example is masked by packing
    labels[0, 7] = IGNORE
    ce, mask = _full_ce(hidden, head, labels)
    # shifted positions: targets 1..9; examples: targets 1-3 (ex0), 5-6 (ex1), 8-9 (ex2)
    c = ce[0]
    expected = (c[0:3].mean() + c[4:6].mean() + c[7:9].mean()) / 3
    assert torch.allclose(sft_loss(hidden, head, labels, mode="sequence", position_ids=pos), expected, atol=1e-6)
    assert count_sequences(labels, pos) == 3


def test_weighted_examples_scale_their_tokens():
    hidden, head, labels = _setup()
    w = torch.tensor([1.0, 2.0, 0.5])[:, None].expand(3, 9)
    ce, mask = _full_ce(hidden, head, labels)
    expected = (ce * w[:, 1:])[mask].sum() / mask.sum()
    assert torch.allclose(sft_loss(hidden, head, labels, loss_weights=w), expected, atol=1e-6)
    seq_expected = torch.stack([ce[b][mask[b]].mean() * w[b, 0] for b in range(3)]).mean()
    assert torch.allclose(sft_loss(hidden, head, labels, loss_weights=w, mode="sequence"), seq_expected, atol=1e-6)


def test_no_trained_token_gives_zero_with_a_graph():
    hidden, head, labels = _setup()
    labels[:] = IGNORE
    loss = sft_loss(hidden, head, labels)
    assert float(loss) == 0.0
    loss.backward()  # still differentiable: a rank with nothing to train must not break DDP


def test_micro_batches_normalised_by_the_step_count_equal_the_full_batch():
    """Accumulation invariant at the loss level; the naive mean of micro-batch means differs."""
    hidden, head, labels = _setup(B=4, S=12)
    labels[0, 1:10] = IGNORE  # uneven trained-token counts per micro-batch
    full = sft_loss(hidden, head, labels)
    total = int((labels[:, 1:] != IGNORE).sum())
    ours = sum(sft_loss(hidden[i:i + 2], head, labels[i:i + 2], num_items=total) for i in (0, 2))
    naive = sum(sft_loss(hidden[i:i + 2], head, labels[i:i + 2]) for i in (0, 2)) / 2
    assert torch.allclose(ours, full, atol=1e-6)
    assert not torch.allclose(naive, full, atol=1e-3)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_a_fused_cross_entropy_takes_the_chunks_place_with_the_same_loss_and_gradients(mode):
    hidden, head, labels = _setup(B=4)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])[:, None].expand(labels.shape)
    spy = PlainFusedCE()
    kw = dict(mode=mode, label_smoothing=0.1, loss_weights=weights, chunk_size=2)
    ours = sft_loss(hidden, head, labels, **kw)
    fused = sft_loss(hidden, head, labels, fused=spy, **kw)
    assert spy.calls == 1
    assert torch.allclose(ours, fused, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [hidden, head.weight]), torch.autograd.grad(fused, [hidden, head.weight])):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_fused_cross_entropy_is_not_used_where_the_head_is_not_a_plain_linear():
    class Adapted(torch.nn.Linear):  # e.g. a LoRA-wrapped or quantized head: not x @ W.T + b
        def forward(self, x):
            return super().forward(x) * 2

    hidden, head, labels = _setup()
    adapted = Adapted(head.in_features, head.out_features, bias=False)
    adapted.weight = head.weight
    spy = PlainFusedCE()
    assert torch.allclose(sft_loss(hidden, adapted, labels, fused=spy), sft_loss(hidden, adapted, labels))
    assert spy.calls == 0
    placeholder = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    placeholder.weight = torch.nn.Parameter(torch.empty(0))  # ZeRO-3: gathered only inside forward

    def gathered_forward(x):
        return F.linear(x, head.weight)

    placeholder.forward = gathered_forward
    assert torch.allclose(sft_loss(hidden, placeholder, labels, fused=spy), sft_loss(hidden, head, labels))
    assert spy.calls == 0
