"""Presets, overrides and the one-line config errors a user sees."""
from __future__ import annotations

import json

import pytest

from lora.config import PRESETS, ConfigError, TrainConfig, resolve_config


def test_presets_match_the_guide():
    p15 = resolve_config("phase1.5", {})
    assert (p15.epochs, p15.batch_size, p15.learning_rate, p15.lora_rank, p15.lora_alpha) == (10, 2, 1e-4, 8, 32)
    assert p15.lr_scheduler == "constant"
    p2a = resolve_config("phase2a", {})
    assert (p2a.epochs, p2a.batch_size, p2a.learning_rate, p2a.lora_rank, p2a.lora_alpha) == (20, 4, 5e-5, 16, 64)
    assert p2a.resolution == 512 and p2a.preset == "phase2a"
    assert resolve_config("phase2a-l2", {}).target_dataset_size == 600
    p2b = resolve_config("phase2b", {})
    assert (p2b.lr_scheduler, p2b.warmup_steps, p2b.gradient_accumulation, p2b.max_grad_norm) == ("cosine", 500, 2, 1.0)
    assert (p2b.epochs, p2b.batch_size, p2b.lora_rank) == (20, 4, 16)
    assert set(PRESETS) == {"phase1.5", "phase2a", "phase2a-l2", "phase2b"}


def test_overrides_file_and_tiny_resolution(tmp_path):
    from lora.model import TINY_RESOLUTION

    assert resolve_config("phase2a", {"model": "tiny"}).resolution == TINY_RESOLUTION
    assert resolve_config("phase2a", {"model": "tiny", "resolution": 128}).resolution == 128
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps({"lora_rank": 4, "epochs": 3, "flip": True}))
    cfg = resolve_config("phase1.5", {"epochs": 5, "seed": None}, cfg_file)
    assert (cfg.lora_rank, cfg.epochs, cfg.flip, cfg.seed) == (4, 5, True, 42)  # override > file > preset
    toml = tmp_path / "train.toml"
    toml.write_text('[train]\nmin_snr_gamma = 5.0\nlr_scheduler = "linear"\n')
    cfg = resolve_config("phase2a", {}, toml)
    assert cfg.min_snr_gamma == 5.0 and cfg.lr_scheduler == "linear"
    # what the Prefect task does: JSON round trip
    assert TrainConfig(**cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("override, message", [
    ({"learning_rate": -1}, "invalid training config: learning_rate: must be > 0"),
    ({"lr_scheduler": "step"}, "lr_scheduler"),
    ({"resolution": 500}, "resolution: must be a multiple of 16"),
    ({"lerning_rate": 1e-4}, "lerning_rate: unknown setting"),
    ({"validation_timesteps": [100, 1000]}, "validation_timesteps"),
])
def test_bad_field_is_named_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("phase2a", override)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="phase1.5, phase2a, phase2a-l2, phase2b"):
        resolve_config("phase3", {})


def test_speed_options_are_one_nested_object_that_old_flat_settings_still_set(tmp_path):
    from lora.config import SPEED_FIELDS, SpeedOptions

    nested = resolve_config("phase2a", {"speed": {"compile": "off", "low_memory": True}})
    flat = resolve_config("phase2a", {"compile": "off", "low_memory": True})  # --set compile=off, presets
    dotted = resolve_config("phase2a", {"speed.compile": "off", "speed.low_memory": True})
    assert nested.speed == flat.speed == dotted.speed == SpeedOptions(compile="off", low_memory=True)
    assert not SPEED_FIELDS & set(TrainConfig.model_fields)  # the recipe holds none of them
    # a config file of an earlier version (flat) and --set over it: the later, flat one wins
    old_file = tmp_path / "old.json"
    old_file.write_text(json.dumps({"speed": {"cuda_graphs": "off"}, "half_norms": "on"}))
    cfg = resolve_config("phase2a", {"half_norms": "off"}, old_file)
    assert (cfg.speed.cuda_graphs, cfg.speed.half_norms) == ("off", "off")
    assert TrainConfig(**cfg.model_dump(mode="json")) == cfg  # the Prefect task's JSON round trip
    with pytest.raises(ConfigError, match="speed.compile: Input should be 'auto', 'on' or 'off'"):
        resolve_config("phase2a", {"compile": "yes"})
    with pytest.raises(ConfigError, match="speed.turbo: unknown setting"):
        resolve_config("phase2a", {"speed.turbo": True})


def test_a_speed_change_between_segments_is_not_a_settings_change():
    from lora.config import config_differences

    # config.json of a run made before SpeedOptions: flat switches beside the recipe
    old_flat = resolve_config("phase2a", {}).model_dump(mode="json")
    old_flat.update(old_flat.pop("speed"), compile="on", low_memory=False)
    new = resolve_config("phase2a", {"compile": "off", "low_memory": True, "cuda_graphs": "off"})
    assert config_differences(old_flat, new.model_dump(mode="json")) == []
    assert config_differences(old_flat, resolve_config("phase2a", {"seed": 7}).model_dump(mode="json")) == ["seed"]


@pytest.mark.parametrize("override, message", [
    ({"learning_rate": float("inf")}, "learning_rate: must be a finite number"),
    ({"learning_rate": float("nan")}, "learning_rate: must be a finite number"),
    ({"text_encoder_lr": 1e6}, "text_encoder_lr: must be <= 1"),
    ({"lora_rank": 1e9}, "lora_rank: must be <= 1024"),  # --set lora_rank=1e9
    ({"lora_alpha": float("inf")}, "lora_alpha: must be a finite number"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm: must be a finite number"),
    ({"batch_size": 10**6}, "batch_size: must be <= 1024"),
    ({"epochs": 10**12}, "epochs: must be <= 100000000"),
    ({"checkpoint_every_minutes": float("inf")}, "checkpoint_every_minutes: must be a finite number"),
    ({"noise_offset": -0.1}, "noise_offset: must be >= 0"),
    ({"validation_fraction": float("nan")}, "validation_fraction: must be a finite number"),
])
def test_non_finite_and_absurd_numbers_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("phase2a", override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_an_infinite_learning_rate_with_exit_2(tmp_path, capsys):
    from animelora.cli import main

    data = tmp_path / "data"
    data.mkdir()
    code = main(["train", "--dataset", str(data), "--run-dir", str(tmp_path / "run"),
                 "--set", "learning_rate=Infinity", "--set", "lora_rank=1e9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: invalid training config:")
    assert "learning_rate: must be a finite number" in err and "lora_rank: must be <= 1024" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given, check", [
    (["compile=off"], lambda c: c.speed.compile == "off"),
    (["speed.compile=off"], lambda c: c.speed.compile == "off"),
    (["samples.steps=4", "samples.every_epochs=2"], lambda c: (c.samples.steps, c.samples.every_epochs) == (4, 2)),
    (["samples=off", "samples.sets=2"], lambda c: (c.samples.enabled, c.samples.sets) == (False, 2)),
])
def test_set_names_speed_and_sample_options_flat_or_dotted(given, check):
    """What the README shows: ``--set compile=off``, ``--set speed.compile=off`` and
    ``--set samples.steps=4`` reach the nested option objects (all three were refused as
    unknown settings before)."""
    from animelora.commands.train import _parse_set

    assert check(resolve_config("phase2a", _parse_set(given)))


def test_an_unknown_dotted_setting_suggests_the_field():
    from animelora.commands.train import _parse_set

    with pytest.raises(ValueError, match=r"unknown setting 'samples.stpes'; did you mean samples.steps"):
        _parse_set(["samples.stpes=4"])
