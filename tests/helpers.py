"""Helpers shared by the tests."""
import torch


def inputs(model, seed=0, batch=2, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


def logits(model, x):
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits


def randomize(model, seed=1, scale=0.1):
    """Give every adapter (and modules_to_save copy) non-trivial values: B starts at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (p if "copies" in name else 0))
    return model


def loss_spans(ex, tok) -> list[str]:
    """An example's loss-bearing tokens (labels equal to their ids), decoded run by run."""
    from lorakit.training.data import IGNORE
    spans, cur = [], []
    for i, t in zip(ex.input_ids, ex.labels):
        if t == IGNORE:
            if cur:
                spans.append(tok.decode(cur))
            cur = []
        else:
            assert t == i
            cur.append(t)
    return spans + ([tok.decode(cur)] if cur else [])
