"""Estimators for choosing among N samples: pass@k, best-of-N by a scorer, majority vote, and
best-of-N's KL to the sampling policy.

From n >= N samples of one prompt, every statistic below is the expectation over a uniformly
random N-subset of them, computed exactly (pass@k, best-of-N) or by seeded draws (majority vote),
so one set of n samples gives the whole curve over N = 1, 2, 4, ..., n without the noise of
drawing each N afresh.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that a random k-subset of the n holds at least one correct sample."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def selection_weights(scores: Sequence[float], N: int) -> list[float]:
    """P(sample i is picked) when a random N-subset of the n samples is drawn and its
    highest-scored member picked, ties broken uniformly at random.

    Sorted ascending, the sample of rank r (1-based) is the subset's maximum with probability
    C(r - 1, N - 1) / C(n, N): the other N - 1 members come from the r - 1 below it. A run of
    tied scores shares its ranks' probabilities equally. The weights sum to 1."""
    n = len(scores)
    if not 1 <= N <= n:
        raise ValueError(f"best-of-N needs 1 <= N <= n, got N={N} for n={n} samples")
    order = sorted(range(n), key=lambda i: scores[i])
    total = math.comb(n, N)
    weights = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        ranks = range(start + 1, end + 2)
        share = sum(math.comb(r - 1, N - 1) for r in ranks) / total / len(ranks)
        for i in order[start : end + 1]:
            weights[i] = share
        start = end + 1
    return weights


def best_of_n(scores: Sequence[float], values: Sequence[float], N: int) -> float:
    """The expected `value` (1/0 correctness, or a gold score) of the highest-`scores`d sample
    of a random N-subset: sum_i P(i picked) * values[i] (`selection_weights`)."""
    weights = selection_weights(scores, N)
    return sum(w * v for w, v in zip(weights, values, strict=True))


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    N: int,
    *,
    draws: int = 200,
    seed: int = 0,
) -> float:
    """The probability that majority voting over a random N-subset picks a correct answer
    (self-consistency, Wang et al. 2023): the most frequent extracted answer wins, a tie among
    the most frequent is broken uniformly, and samples with no answer (None) do not vote (a
    subset with no votes scores 0). Exact for N = 1 and N = n, else the mean of `draws`
    seeded subsets. An answer counts as correct when its samples are (`correct` of the first
    of them)."""
    n = len(answers)
    if not 1 <= N <= n:
        raise ValueError(f"majority vote needs 1 <= N <= n, got N={N} for n={n} samples")
    verdict: dict[str, bool] = {}
    for a, ok in zip(answers, correct, strict=True):
        if a is not None:
            verdict.setdefault(a, bool(ok))

    def vote(members: Sequence[int]) -> float:
        counts = Counter(answers[i] for i in members if answers[i] is not None)
        if not counts:
            return 0.0
        top = max(counts.values())
        leaders = [a for a, k in counts.items() if k == top]
        return sum(verdict[a] for a in leaders) / len(leaders)

    if N == 1:
        return sum(vote([i]) for i in range(n)) / n
    if n == N:
        return vote(range(n))
    rng = random.Random(seed)
    return sum(vote(rng.sample(range(n), N)) for _ in range(draws)) / draws


def best_of_n_kl(N: int) -> float:
    """KL(best-of-N || sampling policy) = ln N - (N - 1) / N, in nats: the analytic value for
    distinct samples (Stiennon et al. 2020, App. G.3; Gao et al. 2022, Sec. 2.2), what puts
    best-of-N on the same gold-vs-KL axes as PPO and GRPO runs."""
    if N < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {N}")
    return math.log(N) - (N - 1) / N
