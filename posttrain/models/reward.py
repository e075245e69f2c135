"""Reward models: a Hugging Face sequence classifier with one scalar output per named head.

`RewardModel` wraps `AutoModelForSequenceClassification` and scores a batch of sequences
`(S, H)`. Two paths:

- Decoder backbones (Llama, Qwen2, Mistral, Gemma, GPT-2...: the classifier's head is named
  `score` and Hugging Face pools at the last non-pad token) take packed batches: the backbone
  (`model.model`, `model.transformer`...) runs on one padding-free row, the hidden state at each
  sequence's last token is gathered, and only those S vectors go through the `score` head. No
  pad token is computed and no full-vocabulary logits exist. This equals the plain Hugging Face
  forward of each sequence alone (tested to 1e-5).
- Encoders (BERT, MiniLM, RoBERTa, DeBERTa: bidirectional, pooled by the model itself) and
  decoders with `data.packing=false` take padded batches through the model's own forward.

The saved model is a plain `AutoModelForSequenceClassification`: `config.id2label` names the
heads, `config.pad_token_id` is set so the plain forward finds the last real token, and
`config.reward_head_weights` holds the weights of the combined reward (`sum_h w_h r_h`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from posttrain.data.packing import Batch
from posttrain.models.loading import model_dir, prepare_for_training, resolve_dtype
from posttrain.models.packed_attention import check_packed_support, model_inputs


def classifier_of(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside DDP / PEFT wrappers (LoRA layers stay in place)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scores_last_token(model: torch.nn.Module) -> bool:
    """True for decoder classifiers: head named `score`, pooled at the last non-pad token."""
    return isinstance(getattr(classifier_of(model), "score", None), torch.nn.Module)


class RewardModel(torch.nn.Module):
    """Scores `(S, H)` for the S sequences of a batch; see the module docstring for the paths."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier
        self.last_token = scores_last_token(classifier)

    @property
    def heads(self) -> list[str]:
        config = classifier_of(self.classifier).config
        return [config.id2label[i] for i in range(config.num_labels)]

    def forward(
        self,
        batch: Batch,
        last_index: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        per_token: bool = False,
    ) -> torch.Tensor:
        """`batch` packed: `last_index` `(S,)` gives each sequence's last token in the row.
        Padded: `(S, T)` rows, scored by the classifier's own pooling. `per_token`: the
        `token_scores` of a packed batch (through `forward`, so DDP sees the call)."""
        if per_token:
            return self.token_scores(batch)
        if batch.packed:
            hf = classifier_of(self.classifier)
            if not self.last_token:
                raise ValueError(
                    f"{type(hf).__name__} does not score at the last token; packed batches need a "
                    "decoder backbone (set data.packing=false for encoders)"
                )
            return self.scores_at(batch, last_index)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.classifier(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra
        ).logits

    def scores_at(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        """`(P, H)` scores of the hidden states at `positions` `(P,)` of a packed row (a
        sequence's last token, or a process reward model's step ends)."""
        hf = classifier_of(self.classifier)
        check_packed_support(hf)
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(**model_inputs(batch)).last_hidden_state[0]  # (N, d)
        return hf.score(hidden[positions])

    def token_scores(self, batch: Batch) -> torch.Tensor:
        """`(K, H)` scores at the K positions that predict a target token of a packed `batch`
        (the same positions and order as `target_logits`): a critic's values V(s_t) of the
        states before each completion token, with the score head on those K states only."""
        hf = classifier_of(self.classifier)
        if not (batch.packed and self.last_token):
            raise ValueError("per-token scores need a packed batch and a decoder backbone")
        check_packed_support(hf)
        _, predictors = batch.target_positions()
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(**model_inputs(batch)).last_hidden_state[0]  # (N, d)
        return hf.score(hidden[predictors])


def load_reward_model(
    path: str,
    device: torch.device,
    *,
    heads: Sequence[str],
    head_weights: Sequence[float],
    pad_token_id: int,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | str = "all-linear",
    key: str = "model.path",
) -> RewardModel:
    """A sequence classifier with `len(heads)` outputs on `device`; the head is new (randomly
    initialized from the current seed) unless `path` already holds one of that size.

    With `lora_r > 0`, LoRA adapters train and so does the whole head (PEFT's `SEQ_CLS` task
    keeps `score` / `classifier` in `modules_to_save`)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir(path, key),
        num_labels=len(heads),
        id2label=dict(enumerate(heads)),
        label2id={name: i for i, name in enumerate(heads)},
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        local_files_only=True,
    ).to(device)
    # The plain forward scores the rightmost token that is not pad_token_id.
    model.config.pad_token_id = pad_token_id
    model.config.reward_head_weights = [float(w) for w in head_weights]
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model = prepare_for_training(
        model, gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules, task_type="SEQ_CLS",
    )  # fmt: skip
    return RewardModel(model)
