"""KTO (TRL 1.16's ``KTOTrainer``) on unpaired completions."""

from __future__ import annotations

import torch

from fastrl.checks import check_tensor, check_zero_one, compute_dtype
from fastrl.ops.preference.inputs import check_vector
from fastrl.options.preference import KTOLossOptions

__all__ = ["kto_loss"]

_D = KTOLossOptions()  # the defaults, declared there


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    loss_type: str = _D.loss_type,
    beta: float = _D.beta,
    desirable_weight: float = _D.desirable_weight,
    undesirable_weight: float = _D.undesirable_weight,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on unpaired completions, as TRL 1.16's ``KTOTrainer``.

    Each row is one completion with a binary label (desirable or not); nothing is paired.
    With ``r = logp - ref_logp`` and ``z0`` the KL reference point:

    - ``"kto"``: desirable ``1 - sigmoid(beta (r - z0))``, undesirable ``1 - sigmoid(beta
      (z0 - r))``; ``z0 = max(0, mean(kl_logps - ref_kl_logps))`` without gradient, the
      KL estimate from mismatched (prompt, completion) pairs: TRL pairs each prompt of the
      batch with the previous example's completion (``(x_i, y_{i-1})``, cyclically);
    - ``"apo_zero_unpaired"``: desirable ``1 - sigmoid(beta r)``, undesirable
      ``sigmoid(beta r)``; no KL term.

    The loss is the mean over rows of ``desirable_weight`` / ``undesirable_weight`` times
    the row's loss (NaN rows skipped, as TRL's ``nanmean``).

    Args:
        logps: ``[B]`` float, summed completion log-probs under the policy; differentiable.
        ref_logps: ``[B]`` float, the same under the reference model (constant).
        labels: ``[B]`` bool or 0/1 tensor, True for desirable completions.
        kl_logps: ``[M]`` float, summed log-probs of the mismatched pairs' completions under
            the policy (TRL computes them without gradient; treated as constant).
            Required by ``"kto"``, refused by ``"apo_zero_unpaired"``.
        ref_kl_logps: ``[M]`` float, the same under the reference model.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        beta: > 0.
        desirable_weight, undesirable_weight: >= 0, the weights of the two kinds of rows.

    Returns:
        ``(loss, metrics)``; metrics as TRL logs them: ``kl`` (``z0``; 0 for
        ``apo_zero_unpaired``), ``rewards/chosen`` / ``logps/chosen`` (means over
        desirable rows of ``beta * r`` and ``logp``), ``rewards/rejected`` /
        ``logps/rejected``, and ``rewards/margins`` (their difference). Without a host
        synchronisation: the means of a kind the batch has no row of are NaN (TRL logs
        nothing for it; fastrl's trainers skip NaN metric values), and so is the margin.

    Raises:
        ValueError: unknown ``loss_type``; mismatched shapes; ``labels`` not 0/1;
            ``kl_logps``/``ref_kl_logps`` missing for ``"kto"`` or given to
            ``"apo_zero_unpaired"``; out-of-range numbers.
        TypeError: non-tensor or non-floating log-probs; non-numeric hyper-parameters.
    """
    KTOLossOptions(loss_type, beta, desirable_weight, undesirable_weight).validate()
    check_vector("logps", logps, like="logps")
    B = logps.shape[0]
    if B == 0:
        raise ValueError("logps must hold at least one completion, got shape (0,)")
    check_vector("ref_logps", ref_logps, B, like="logps")
    check_tensor("labels", labels, floating=False)
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [B]=({B},) like logps, got {tuple(labels.shape)}")
    check_zero_one(labels, "labels")
    if loss_type == "kto":
        for name, x in (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if x is None:
                raise ValueError(
                    f"loss_type='kto' estimates its KL reference point from mismatched pairs: "
                    f"pass {name} (got None)"
                )
        check_vector("kl_logps", kl_logps)
        if kl_logps.shape[0] == 0:
            raise ValueError("kl_logps must hold at least one mismatched pair, got shape (0,)")
        check_vector("ref_kl_logps", ref_kl_logps, kl_logps.shape[0], like="kl_logps")
    else:
        for name, x in (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if x is not None:
                raise ValueError(f"loss_type={loss_type!r} has no KL term: {name} must be None")

    cdt = compute_dtype(logps)
    lp = logps.to(cdt)
    logratios = lp - ref_logps.detach().to(cdt)
    desirable = labels.bool()
    if loss_type == "kto":
        with torch.no_grad():
            kl = (kl_logps.to(cdt) - ref_kl_logps.to(cdt)).mean().clamp(min=0)
        loss_d = 1 - torch.sigmoid(beta * (logratios - kl))
        loss_u = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        kl = torch.zeros((), dtype=cdt, device=lp.device)
        loss_d = 1 - torch.sigmoid(beta * logratios)
        loss_u = torch.sigmoid(beta * logratios)
    weighted = torch.where(
        desirable, float(desirable_weight) * loss_d, float(undesirable_weight) * loss_u
    )
    loss = weighted.nanmean()

    # no host sync: counts stay on the device, a kind absent from the batch gives 0/0 =
    # NaN, which the trainers' logging windows skip (as TRL logs nothing for it)
    metrics = {"kl": kl}
    rewards = beta * logratios.detach()
    lp_d = lp.detach()
    for kind, rows in (("chosen", desirable), ("rejected", ~desirable)):
        n = rows.sum().to(cdt)
        metrics[f"rewards/{kind}"] = torch.where(rows, rewards, 0).nansum() / n
        metrics[f"logps/{kind}"] = torch.where(rows, lp_d, 0).nansum() / n
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics = {k: v.detach().to(cdt) for k, v in metrics.items()}
    return loss, metrics
