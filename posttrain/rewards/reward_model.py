"""Learned reward models as reward functions: one model, or an ensemble with its disagreement.

`RewardModelScorer` loads a model that `posttrain rm` saved (or any Hugging Face
`AutoModelForSequenceClassification` reward model) and scores `(prompt, completion)` exactly as
training did (`posttrain.data.reward.RewardEncoder`): the prompt through the tokenizer's chat
template when it has one, decoders padding-free with each distinct prompt computed once for all
its completions (GRPO's G samples of a prompt share it), encoders padded.

Long inputs never fail: a sequence over `max_length` tokens keeps the end of its prompt (cut
from the left) and all of its completion; a completion longer than `max_length` on its own
keeps its last `max_length` tokens, since a decoder's score is read at the last token.

Several heads: the score is `sum_h w_h r_h` with `weights` (default: the weights saved with
the model, `config.reward_head_weights`, else the mean), and each head is a component.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from posttrain.data.reward import Comparison, RewardEncoder, collate_comparisons
from posttrain.data.tokenize import uses_chat_template
from posttrain.models.loading import load_tokenizer, resolve_dtype
from posttrain.models.packed_attention import enable_packed_attention
from posttrain.models.reward import RewardModel
from posttrain.rewards.base import RewardOutput


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RewardModelScorer:
    """`fn(prompts, completions, **fields) -> RewardOutput` from a trained reward model.

    Args:
        path: a model directory (`runs/rm/final`).
        batch_size: sequences per forward pass.
        max_length: longest scored sequence in tokens; longer inputs are truncated as the
            module docstring says.
        device: 'auto' (cuda when available), 'cpu' or 'cuda[:i]'.
        dtype: weight dtype ('float32', 'bfloat16', 'float16'; 'auto' is float32).
        weights: per-head weights of the combined score, as a list in head order or a
            {head: weight} mapping (heads left out weigh 0).
        chat_template: 'auto' | 'always' | 'never', as `data.chat_template` in training.
        name: the reward's name in logs.
    """

    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 32,
        max_length: int = 2048,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        weights: Sequence[float] | Mapping[str, float] | None = None,
        chat_template: str = "auto",
        name: str = "reward_model",
    ):
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        self.device = _device(device)
        tokenizer = load_tokenizer(path, "reward_model")
        architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(
                f"reward_model: {path!r} holds a {'/'.join(architectures) or 'model'} with no "
                "reward head; train one with `posttrain rm` (or load any sequence classifier)"
            )
        classifier = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype), attn_implementation="sdpa", local_files_only=True
        )
        if classifier.config.pad_token_id is None:
            classifier.config.pad_token_id = tokenizer.pad_token_id
        enable_packed_attention()
        self.model = RewardModel(classifier.to(self.device).eval())
        self.heads = self.model.heads
        saved = getattr(classifier.config, "reward_head_weights", None)
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.heads)
            if unknown:
                raise ValueError(
                    f"weights for unknown heads {sorted(unknown)}; heads: {self.heads}"
                )
            weights = [float(weights.get(h, 0.0)) for h in self.heads]
        weights = list(weights or saved or [1 / len(self.heads)] * len(self.heads))
        if len(weights) != len(self.heads):
            raise ValueError(f"{len(weights)} weights for the {len(self.heads)} heads {self.heads}")
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.encoder = RewardEncoder(
            tokenizer,
            decoder=self.model.last_token,
            chat=uses_chat_template(tokenizer, chat_template),
        )
        self.layout = "shared" if self.model.last_token else "padded"

    @torch.no_grad()
    def head_scores(self, prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        """`(B, H)` float32 scores of every head, in input order."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        # Group completions whose (truncated) prompt tokens are equal: one prompt, K answers.
        groups: dict[tuple[int, ...], tuple[list[int], list[list[int]]]] = {}
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            head, tail = self.encoder.encode(prompt, completion)
            if self.encoder.decoder and not tail:  # an empty completion: score a lone pad
                tail = [self.encoder.pad_id]
            head, (tail,) = self.encoder.fit(head, [tail], self.max_length)
            members = groups.setdefault(tuple(head), (head, []))
            members[1].append((i, tail))
        order: list[int] = []
        chunks: list[list[Comparison]] = [[]]
        filled = 0
        for head, members in groups.values():
            for start in range(0, len(members), self.batch_size):
                part = members[start : start + self.batch_size]
                if filled + len(part) > self.batch_size:
                    chunks.append([])
                    filled = 0
                chunks[-1].append(Comparison(head, [t for _, t in part], [], []))
                order += [i for i, _ in part]
                filled += len(part)
        scores = []
        for chunk in chunks:
            if chunk:
                rb = collate_comparisons(chunk, self.encoder, self.layout).to(self.device)
                scores.append(self.model(rb.batch, rb.last_index, rb.token_type_ids).float().cpu())
        out = torch.empty(len(order), len(self.heads))
        if scores:
            out[torch.tensor(order)] = torch.cat(scores)
        return out

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        by_head = self.head_scores(prompts, completions)
        combined = by_head @ self.weights
        components = (
            {h: by_head[:, i].tolist() for i, h in enumerate(self.heads)}
            if len(self.heads) > 1
            else {}
        )
        return RewardOutput(combined.tolist(), components)


class EnsembleRewardModel:
    """Several reward models scoring the same completions: their mean and disagreement.

        score = mean_m r_m - k * std_m r_m

    with the population standard deviation over the M members (divided by M). k > 0 gives the
    conservative, uncertainty-penalized reward of Coste et al. 2023 ("Reward model ensembles
    help mitigate overoptimization", who penalize the variance) and Eisenstein et al. 2023;
    k = 0 is the plain ensemble mean. Components: `mean`, `std`, and each member's score as
    `rm{i}`. Other keyword arguments go to every `RewardModelScorer`.
    """

    def __init__(
        self, paths: Sequence[str], *, k: float = 1.0, name: str = "reward_ensemble", **kwargs: Any
    ):
        if len(paths) < 2:
            raise ValueError(f"an ensemble needs at least 2 reward models, got {len(paths)}")
        self.name, self.k = name, k
        self.members = [RewardModelScorer(p, **kwargs) for p in paths]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        each = torch.tensor([m(prompts, completions).scores for m in self.members])  # (M, B)
        mean, std = each.mean(0), each.std(0, correction=0)
        components = {"mean": mean.tolist(), "std": std.tolist()}
        components.update({f"rm{i}": row.tolist() for i, row in enumerate(each)})
        return RewardOutput((mean - self.k * std).tolist(), components)
