"""The training loss: chunked cross-entropy equals the full one, value and gradients."""

import torch
import torch.nn.functional as F

from trainer.loss import answer_token_loss, chunked_linear_cross_entropy


def test_chunked_equals_full_cross_entropy_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    full = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    gh, gw = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=8)  # 5 chunks, the last of 5 rows
    ch, cw = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(chunked.double(), full, rtol=1e-6)
    assert torch.allclose(ch, gh, rtol=1e-6) and torch.allclose(cw, gw, rtol=1e-6)


def test_only_the_given_positions_are_scored():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, generator=g)  # [batch, seq, h]
    positions = torch.tensor([1, 2, 7])  # row 0 tokens 1, 2; row 1 token 2
    targets = torch.tensor([3, 4, 10])
    got = answer_token_loss(hidden, head, positions, targets, fused=True)  # no CUDA: the PyTorch path
    rows = hidden.reshape(10, 8)[positions]
    want = F.cross_entropy(head(rows), targets, reduction="sum")
    assert torch.allclose(got, want, rtol=1e-5)
