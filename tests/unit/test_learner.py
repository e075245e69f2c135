import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.packing import pack
from posttrain.data.tokenize import TokenizedExample
from posttrain.files import write_atomic
from posttrain.models.logprobs import nll_sum
from posttrain.train import checkpoint
from posttrain.train.distributed import Dist
from posttrain.train.learner import Learner, step_indices
from posttrain.train.schedule import lr_factor

ONE = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def test_schedule_by_hand():
    kw = dict(total=10, warmup=2)
    assert lr_factor(0, kind="cosine", **kw) == 0.5  # (0 + 1) / 2
    assert lr_factor(1, kind="cosine", **kw) == 1.0
    assert lr_factor(2, kind="cosine", **kw) == 1.0  # progress 0 / 8
    # step 6: progress (6 - 2) / 8 = 0.5 -> 0.5 (1 + cos(pi / 2)) = 0.5
    assert lr_factor(6, kind="cosine", **kw) == pytest.approx(0.5)
    # linear to a floor of 0.1: 0.1 + 0.9 (1 - 0.5) = 0.55
    assert lr_factor(6, kind="linear", min_ratio=0.1, **kw) == pytest.approx(0.55)
    assert lr_factor(10, kind="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, kind="constant", **kw) == 1.0
    assert lr_factor(3, total=5, warmup=0, kind="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.6))
    )


def test_step_indices_cover_each_epoch_and_cross_its_boundary():
    seen = [i for s in range(3) for i in step_indices(s, num_examples=6, batch_size=4, seed=1)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    assert step_indices(1, num_examples=6, batch_size=4, seed=1) == seen[4:8]  # a pure function
    assert step_indices(0, num_examples=6, batch_size=4, seed=2) != seen[:4]


def _examples() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    lengths = (7, 4, 11, 6)
    return [
        TokenizedExample(
            torch.randint(0, 256, (n,), generator=g).tolist(), [False] + [True] * (n - 1)
        )
        for n in lengths
    ]


def _train(path, micro_batches: list[list[int]], steps: int = 2) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    # Adam's eps well above rounding noise: otherwise near-zero gradients flip sign between two
    # summation orders and Adam turns a 1e-9 difference into a full lr-sized step.
    learner = Learner(model, ONE, lr=1e-2, total_steps=steps, max_grad_norm=0.5, eps=1e-4)
    examples = _examples()
    for _ in range(steps):
        batches = [pack([examples[i] for i in mb]) for mb in micro_batches]
        learner.step(batches, [b.num_targets for b in batches], lambda m, b: (nll_sum(m, b), {}))
    return model.state_dict()


def test_accumulation_is_exact(tiny_qwen2):
    """One micro-batch of 4 sequences, or 3 uneven micro-batches: the same update, because the
    summed loss is divided by the whole step's token count, not each micro-batch's."""
    whole = _train(tiny_qwen2, [[0, 1, 2, 3]])
    split = _train(tiny_qwen2, [[0], [1, 2], [3]])
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], atol=1e-5, rtol=1e-4)


def test_step_reports_token_weighted_loss(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    examples = _examples()
    batches = [pack(examples[:1]), pack(examples[1:])]
    with torch.no_grad():
        expected = sum(nll_sum(model, b).item() for b in batches) / sum(
            b.num_targets for b in batches
        )
    learner = Learner(model, ONE, lr=1e-3, total_steps=1)
    metrics = learner.step(
        batches, [b.num_targets for b in batches], lambda m, b: (nll_sum(m, b), {})
    )
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["lr"] == 0.0 and metrics["grad_norm"] > 0  # cosine over 1 step ends at 0


def save(learner: Learner, out, step: int, keep: int = 2) -> None:
    checkpoint.save_checkpoint(out / "checkpoints", step, {"model": learner.part}, ONE, keep=keep)


def resume(learner: Learner, out) -> int:
    """What `Run.resume` does: drop partial writes, load the latest checkpoint."""
    root = out / "checkpoints"
    checkpoint.remove_partial(root)
    found = checkpoint.list_checkpoints(root)
    if not found:
        return 0
    return checkpoint.load_checkpoint(found[-1], {"model": learner.part}, ONE)["step"]


def test_checkpoint_round_trip_prunes_and_ignores_partial(tmp_path, tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    learner = Learner(model, ONE, lr=1e-2, total_steps=10)
    batch = pack(_examples())
    loss_fn = lambda m, b: (nll_sum(m, b), {})  # noqa: E731
    for step in range(1, 4):
        learner.step([batch], [batch.num_targets], loss_fn)
        save(learner, tmp_path, step)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "checkpoints" / ".tmp-step-00000004").mkdir()  # what a kill mid-write leaves
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000002", "step-00000003"]

    learner.step([batch], [batch.num_targets], loss_fn)  # move on, then come back
    fresh = Learner(AutoModelForCausalLM.from_pretrained(tiny_qwen2), ONE, lr=1e-2, total_steps=10)
    assert resume(fresh, tmp_path) == 3
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()
    for key, value in fresh.module.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert fresh.scheduler.last_epoch == 3
    # the next step from the restored state equals the next step of the original run
    learner2 = Learner(
        AutoModelForCausalLM.from_pretrained(tiny_qwen2), ONE, lr=1e-2, total_steps=10
    )
    resume(learner2, tmp_path)
    a = fresh.step([batch], [batch.num_targets], loss_fn)
    b = learner2.step([batch], [batch.num_targets], loss_fn)
    assert a == b


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, tiny_qwen2, monkeypatch):
    """Dying inside the deletion of an old checkpoint must not leave a `step-N` directory with
    files missing (resume would pick it, or a reader would find it broken)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    learner = Learner(model, ONE, lr=1e-2, total_steps=10)
    batch = pack(_examples())
    loss_fn = lambda m, b: (nll_sum(m, b), {})  # noqa: E731
    for step in (1, 2):
        learner.step([batch], [batch.num_targets], loss_fn)
        save(learner, tmp_path, step)

    def die_halfway(path, ignore_errors=False):  # delete one file, then "get killed"
        if not path.exists():
            return
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", die_halfway)
    learner.step([batch], [batch.num_targets], loss_fn)
    with pytest.raises(KeyboardInterrupt):
        save(learner, tmp_path, 3)  # prunes step 1
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    for ckpt in checkpoint.list_checkpoints(root):
        names = {f.name for f in ckpt.iterdir()}
        assert {"model.safetensors", "model-optimizer.pt", "state.json", "rng-rank0.pt"} <= names
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    fresh = Learner(AutoModelForCausalLM.from_pretrained(tiny_qwen2), ONE, lr=1e-2, total_steps=10)
    assert resume(fresh, tmp_path) == 3
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the leftover is gone


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "d" / "summary.json"
    write_atomic(path, lambda f: f.write(b'{"round": 1}'))
    assert path.read_bytes() == b'{"round": 1}'

    def dies_halfway(f):
        f.write(b'{"round": 2, "pai')
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_halfway)
    assert path.read_bytes() == b'{"round": 1}'  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary left
