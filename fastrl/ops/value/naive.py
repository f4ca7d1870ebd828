"""Naive oracle for `value_loss`: token by token in float64, differentiable in values."""

import torch


def naive_value_loss(
    values, old_values, returns, mask, *, value_clip=None, token_level_loss=True,
    num_items_in_batch=None,
):  # fmt: skip
    """Same contract as `fastrl.value_loss` (no validation); float64 loss and metrics."""
    B, T = values.shape
    v = values.double()
    zero = torch.zeros((), dtype=torch.float64)
    rows, flags, preds = [], [], []
    for b in range(B):
        row = []
        for t in range(T):
            if not bool(mask[b, t]):
                continue
            target = float(returns[b, t])
            loss_t = (v[b, t] - target) ** 2
            if value_clip is not None:
                old = float(old_values[b, t])
                moved = torch.clamp(v[b, t] - old, -value_clip, value_clip)
                clipped = (old + moved - target) ** 2
                flags.append(float(clipped > loss_t))
                loss_t = torch.maximum(clipped, loss_t)
            row.append(loss_t)
            preds.append(float(values[b, t].detach()))
        rows.append(row)
    if not token_level_loss:
        means = [sum(r, zero) / len(r) for r in rows if r]
        loss = sum(means, zero) / max(len(means), 1)
    else:
        n = sum(len(r) for r in rows) if num_items_in_batch is None else float(num_items_in_batch)
        loss = sum((sum(r, zero) for r in rows), zero) / max(n, 1)
    loss = 0.5 * loss
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)
    metrics = {
        "value_loss": loss.detach(),
        "values": f64(sum(preds) / max(len(preds), 1)),
        "vf_clipfrac": f64(sum(flags) / max(len(preds), 1)),
    }
    return loss, metrics
