"""Reference-model log-probabilities for offline preference methods (DPO family, KTO).

- `sequence_logprobs`: per-sequence sums of target-token log-probs for any batch (packed,
  shared-prefix or padded), from `target_logprobs` and `Batch.target_sequence_ids`.
- `Reference`: the frozen reference forward, either a separate model or, for a LoRA policy, the
  policy itself with its adapters disabled (`peft`'s `disable_adapter()`), so no second copy of
  the weights sits in memory.
- `fingerprint`, `tokens_fingerprint`, `directory_fingerprint`, `load_cached`, `save_cached`: an on-disk cache of
  precomputed reference log-probs, keyed by a hash of the model's files, the token ids and the
  settings that change the numbers, written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from posttrain.data.packing import Batch
from posttrain.files import write_atomic
from posttrain.models.logprobs import target_logprobs


def sequence_logprobs(model: torch.nn.Module, batch: Batch, num_sequences: int) -> torch.Tensor:
    """`(S,)` summed log-probs of each sequence's target tokens, sequences numbered as
    `Batch.target_sequence_ids` numbers them (for `pack_shared`, each answer in packing order)."""
    logps = target_logprobs(model, batch)
    ids = batch.target_sequence_ids()
    return logps.new_zeros(num_sequences).index_add(0, ids, logps)


class Reference:
    """The reference policy's log-probs, computed without gradients and in eval mode.

    `separate`: a frozen model; None uses `policy` with its LoRA adapters disabled, which is the
    policy's starting point when the adapters were freshly initialised (LoRA's B matrix is zero).
    `autocast`: a callable returning the context the forward runs in (the learner's autocast).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        separate: torch.nn.Module | None = None,
        autocast=contextlib.nullcontext,
    ) -> None:
        policy = getattr(policy, "module", policy)  # DDP wraps the model
        if separate is None and not hasattr(policy, "disable_adapter"):
            raise ValueError(
                "a reference needs a separate model unless the policy has LoRA adapters to disable"
            )
        self.policy, self.separate, self.autocast = policy, separate, autocast

    @contextlib.contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        """The module to call for reference log-probs, in eval mode for the duration."""
        module = self.separate if self.separate is not None else self.policy
        was_training = module.training
        module.eval()
        try:
            with (
                self.policy.disable_adapter() if self.separate is None else contextlib.nullcontext()
            ):
                yield module
        finally:
            module.train(was_training)

    @torch.no_grad()
    def sequence_logprobs(self, batch: Batch, num_sequences: int) -> torch.Tensor:
        """`(S,)` float32 summed reference log-probs, as `sequence_logprobs` numbers them."""
        with self.model() as module, self.autocast():
            return sequence_logprobs(module, batch, num_sequences).float()


# The cache -------------------------------------------------------------------------------


def directory_fingerprint(path: str | Path) -> str:
    """sha256 over every file under `path`: relative names and contents (about 1 s per GB)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def fingerprint(*parts: object) -> str:
    """sha256 of the parts' reprs (strings, numbers, settings)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()


def tokens_fingerprint(sequences: Iterable[Sequence[int]]) -> str:
    """sha256 of token-id sequences, each length-prefixed (so [1, 2], [3] != [1], [2, 3])."""
    digest = hashlib.sha256()
    for ids in sequences:
        digest.update(array("q", [len(ids), *ids]).tobytes())
    return digest.hexdigest()


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors saved at `path`, or None if there is no such file."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_cached(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` to `path` atomically (`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(tensors, f))
