"""Preference losses: the Bradley-Terry reward-model loss and the DPO family.

Inputs are one value per sequence, `(B,)`: summed log-probs of a completion under the policy
and the reference (DPO, IPO, hinge, robust DPO, KTO), length-normalized mean log-probs (SimPO,
ORPO), or reward-model scores. Build them from token log-probs with `seq_sum` / `seq_mean`
(`posttrain.losses.aggregation`), which take padded or packed tokens.

Every function returns `(loss, metrics)`: the mean loss over the batch, and 0-d detached
tensors. Pairwise losses report `rewards/chosen`, `rewards/rejected` (mean implicit rewards),
`rewards/margin` (mean chosen - rejected) and `rewards/accuracy` (fraction of pairs with
chosen > rejected), plus extras each docstring lists; KTO, being unpaired, reports its own.
DPO-family implicit rewards are `beta * (logp - ref_logp)`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
    }


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss under the Bradley-Terry model (InstructGPT, Ouyang et al. 2022, eq. 1).

        loss = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    - `margin` m `(B,)`: the preference strength (Llama 2, Touvron et al. 2023, eq. 2).
    - `center_coef`: Eisenstein et al. 2023's auxiliary term, which pulls the rewards of each
      pair towards zero sum so that scores are comparable across prompts (0.01 in the paper).
    - `weights` w `(B,)`: each mean becomes the weighted mean sum(w * x) / sum(w), e.g.
      w = 1 / C(K, 2) for the pairs of a K-way ranking (InstructGPT eq. 1's normalization).

    `chosen_rewards`, `rejected_rewards`: `(B,)` scalar rewards of each pair.
    """
    mean = (
        (lambda x: x.mean()) if weights is None else (lambda x: (weights * x).sum() / weights.sum())
    )
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    loss = mean(-F.logsigmoid(logits))
    if center_coef:
        loss = loss + center_coef * mean((chosen_rewards + rejected_rewards) ** 2)
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


def _dpo_parts(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The log-ratio margin h and the implicit-reward metrics shared by the DPO family."""
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    metrics = _reward_metrics(beta * chosen_log_ratio, beta * rejected_log_ratio)
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return chosen_log_ratio - rejected_log_ratio, metrics


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7), with cDPO label smoothing (Mitchell 2023).

        h = (logp_c - ref_c) - (logp_r - ref_r)
        loss = mean(-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h))

    `label_smoothing` eps is the assumed probability that a label is flipped; 0 is plain DPO.
    All four inputs are `(B,)` summed completion log-probs.
    """
    h, metrics = _dpo_parts(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses.mean(), metrics


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO").

        loss = mean((-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps))

    An unbiased estimate of the clean-label DPO loss when each label is flipped with
    probability `label_smoothing` eps < 0.5. Inputs as in `dpo_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, metrics = _dpo_parts(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses.mean(), metrics


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO (Azar et al. 2023, the sampled IPO loss of Sec. 5), with tau = `beta`.

        loss = mean((h - 1 / (2 beta))^2)

    A squared loss, minimized at the log-ratio margin h = 1/(2 beta) rather than pushed to
    infinity. Takes whatever log-probs it is given: TRL passes per-token means for IPO, this
    library's recipes pass sums unless configured otherwise. Inputs as in `dpo_loss`.
    """
    h, metrics = _dpo_parts(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return ((h - 1 / (2 * beta)) ** 2).mean(), metrics


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge loss of SLiC-HF (Zhao et al. 2023), on the reference-normalized margin.

        loss = mean(max(0, 1 - beta h))

    SLiC's calibration loss uses the raw log-prob margin with delta = 1/beta and no reference
    model; like TRL's `hinge`, this uses the DPO log-ratio margin h. Inputs as in `dpo_loss`.
    """
    h, metrics = _dpo_parts(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1 - beta * h).mean(), metrics


# The pairwise losses that share dpo_loss's inputs, by the name a DPO config uses.
def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6): no reference model, length-normalized rewards.

        loss = mean(-log sigmoid(beta * avg_c - beta * avg_r - gamma))

    `chosen_avg_logps`, `rejected_avg_logps`: `(B,)` policy log-probs averaged over each
    completion's tokens (`seq_mean`). `gamma` is the absolute target reward margin (the paper
    tunes gamma / beta around 0.5). Implicit rewards are `beta * avg_logps`.
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


def orpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    lam: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024, eq. 6-7): SFT on the chosen completion plus an odds-ratio term.

        log odds(y) = avg_logp - log(1 - exp(avg_logp))
        loss = mean(-avg_c) + lam * mean(-log sigmoid(log odds(y_c) - log odds(y_r)))

    `chosen_avg_logps`, `rejected_avg_logps`: `(B,)` policy log-probs averaged over each
    completion's tokens, as in the paper's code. Departure: the NLL term is the mean over
    pairs of per-completion token means; the paper's code takes the mean over all chosen
    tokens of the batch. Implicit rewards are the mean log-probs.

    Extra metrics: `nll`, `log_odds_ratio`.
    """

    def log_odds(avg_logps: Tensor) -> Tensor:
        return avg_logps - torch.log(-torch.expm1(avg_logps))  # log(p / (1 - p)), p = e^avg

    log_odds_ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    nll = -chosen_avg_logps.mean()
    loss = nll - lam * F.logsigmoid(log_odds_ratio).mean()
    metrics = _reward_metrics(chosen_avg_logps, rejected_avg_logps)
    metrics["nll"] = nll.detach()
    metrics["log_odds_ratio"] = log_odds_ratio.detach().mean()
    return loss, metrics


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024, Sec. 4): unpaired completions labelled good or bad.

        r = logp - ref_logp
        z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), detached
        loss_i = w_D (1 - sigmoid(beta (r_i - z0)))   if desirable_i
                 w_U (1 - sigmoid(beta (z0 - r_i)))   otherwise
        loss = mean_i(loss_i)

    which is the paper's `lambda_y - v(x, y)`. z0, the reference point, estimates
    KL(pi || pi_ref) from mismatched pairs: completions scored under a prompt they were not
    written for (e.g. completion i with prompt i + 1), as the paper does. The paper suggests
    `w_D n_D / (w_U n_U)` in [1, 4/3].

    Args:
        policy_logps, ref_logps: `(B,)` summed completion log-probs.
        desirable: `(B,)` bool, True for a desirable completion.
        policy_kl_logps, ref_kl_logps: `(M,)` summed log-probs of the mismatched pairs,
            usually M = B; gather them from every process first for a global z0.

    Metrics: `rewards/chosen` and `rewards/rejected` are the mean `beta * r` over desirable
    and undesirable completions (0 if the batch has none); `kl` is z0.
    """
    desirable = desirable.bool()
    log_ratio = policy_logps - ref_logps
    z0 = (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio))),
    )
    rewards = beta * log_ratio.detach()
    n_desirable = desirable.sum().clamp(min=1)
    n_undesirable = (~desirable).sum().clamp(min=1)
    metrics = {
        "rewards/chosen": torch.where(desirable, rewards, 0.0).sum() / n_desirable,
        "rewards/rejected": torch.where(desirable, 0.0, rewards).sum() / n_undesirable,
        "kl": z0,
    }
    return losses.mean(), metrics


def _columns(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[:, 0], x[:, 1]


def pair_loss(
    loss: str,
    logps: Tensor,
    ref_logps: Tensor | None,
    lengths: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
    orpo_lambda: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The preference loss named `loss` (`PAIR_LOSSES`) of pairs given as columns (chosen,
    rejected): summed policy log-probs `logps` `(B, 2)`, the reference's `ref_logps` `(B, 2)`
    (None for the reference-free simpo and orpo) and answer lengths `lengths` `(B, 2)`.

    IPO, SimPO and ORPO read per-token means (sum / length): IPO as TRL does after confirming
    with its authors (trl DPOTrainer), SimPO and ORPO as their papers define them."""
    try:
        fn = PAIR_LOSSES[loss]
    except KeyError:
        raise ValueError(
            f"unknown pair loss {loss!r}; expected one of {sorted(PAIR_LOSSES)}"
        ) from None
    options = dict(beta=beta, label_smoothing=label_smoothing, gamma=simpo_gamma, lam=orpo_lambda)
    return fn(logps, ref_logps, lengths, **options)


# name -> (logps (B, 2), ref_logps (B, 2) | None, lengths (B, 2), **options) -> (loss, metrics)
PAIR_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "dpo": lambda p, r, n, beta, **_: dpo_loss(*_columns(p), *_columns(r), beta=beta),
    "cdpo": lambda p, r, n, beta, label_smoothing, **_: dpo_loss(
        *_columns(p), *_columns(r), beta=beta, label_smoothing=label_smoothing
    ),
    "robust": lambda p, r, n, beta, label_smoothing, **_: robust_dpo_loss(
        *_columns(p), *_columns(r), beta=beta, label_smoothing=label_smoothing
    ),
    "ipo": lambda p, r, n, beta, **_: ipo_loss(*_columns(p / n), *_columns(r / n), beta=beta),
    "hinge": lambda p, r, n, beta, **_: hinge_loss(*_columns(p), *_columns(r), beta=beta),
    "simpo": lambda p, r, n, beta, gamma, **_: simpo_loss(*_columns(p / n), beta=beta, gamma=gamma),
    "orpo": lambda p, r, n, lam, **_: orpo_loss(*_columns(p / n), lam=lam),
}
