import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.recipes.sft import SFTConfig


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\nmodel:\n  lora:\n    r: 4\n")
    cfg = load_config(SFTConfig, path, ["optim.lr=3e-5", "model.lora.enabled=true"])
    assert cfg.optim.lr == 3e-5  # the override wins over the file
    assert cfg.model.lora.r == 4 and cfg.model.lora.enabled is True
    assert cfg.train.batch_size == 16  # untouched default


def test_misspelled_key_names_it_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"):
        load_config(SFTConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(SFTConfig, None, ["trian.seed=1"])


def test_misspelled_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  max_step: 5\n")
    with pytest.raises(
        ConfigError, match=r"(?s)bad.yaml.*'run.max_step'; did you mean 'run.max_steps'"
    ):
        load_config(SFTConfig, path)


@pytest.mark.parametrize(
    "command, old, new",
    [
        ("sft", "train.out_dir", "'run.out_dir'"),
        ("dpo", "train.seed", "'run.seed'"),
        ("rm", "train.save_every", "'run.save_every'"),
        ("grpo", "grpo.max_new_tokens", "'sampling.max_new_tokens'"),
        ("grpo", "grpo.temperature", "'sampling.temperature' or 'evaluation.temperature'"),
        ("iterative-dpo", "out_dir", "'run.out_dir'"),
        ("iterative-dpo", "iterate.rounds", "'run.max_steps'"),
    ],
)
def test_an_old_spelling_names_the_key_that_replaced_it(command, old, new, capsys):
    """Run settings live in one `run` section in every recipe, sampling in `sampling`."""
    assert main([command, "--dry-run", f"{old}=1"]) == 2
    assert f"unknown key '{old}': it is {new}" in capsys.readouterr().err


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"'optim.lr': expected float, got 'fast'"):
        load_config(SFTConfig, None, ["optim.lr=fast"])
    with pytest.raises(
        ConfigError, match=r"'optim.schedule': expected 'cosine' \| 'linear' \| 'constant'"
    ):
        load_config(SFTConfig, None, ["optim.schedule=cos"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(SFTConfig, None, ["optim.lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_dry_run_prints_resolved_config(capsys):
    assert main(["sft", "--dry-run", "optim.lr=0.5", "run.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "max_steps: 7" in out


def test_bad_override_exits_2_with_message(capsys):
    assert main(["sft", "--dry-run", "optim.lrr=0.5"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_help_shows_every_field_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "optim.lr (float, default 0.0001)" in out
    assert "Peak learning rate of AdamW." in out
    assert "train.micro_batch_size" in out and "model.lora.r" in out


def test_model_level_validator_error_is_reported_not_crashed():
    from pydantic import model_validator

    from posttrain.config import Section

    class Pair(Section):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def ordered(self):
            if self.low > self.high:
                raise ValueError("low must not exceed high")
            return self

    with pytest.raises(ConfigError, match="invalid config: .*low must not exceed high"):
        load_config(Pair, None, ["low=5"])


def test_a_section_given_in_part_keeps_the_recipes_defaults_for_the_rest():
    """DPO's optim defaults to lr 1e-6 and GRPO's run to out_dir runs/grpo, eval_every 10: a key
    set beside them must not bring back the section class's own defaults (1e-4, runs/run, 0)."""
    from posttrain.recipes.dpo import DPOConfig
    from posttrain.recipes.grpo_config import GRPOConfig

    dpo = load_config(DPOConfig, None, ["optim.warmup_steps=10"])
    assert (dpo.optim.lr, dpo.optim.warmup_steps, dpo.run.out_dir) == (1e-6, 10, "runs/dpo")
    grpo = load_config(GRPOConfig, None, ["run.max_steps=5"])
    assert (grpo.run.out_dir, grpo.run.eval_every, grpo.run.max_steps) == ("runs/grpo", 10, 5)
    assert load_config(GRPOConfig, None, ["run.eval_every=0"]).run.eval_every == 0
