import dataclasses

import pytest

from bge.config import TrainConfig, build_parser, parse_args
from bge.errors import UserError


def other_value(f: dataclasses.Field):
    """A valid non-default value of the field's type."""
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != f.default)
    if isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, int):
        return f.default + 3
    if isinstance(f.default, float):
        return f.default + 0.25
    return (f.default or "v") + "x"


def test_every_field_round_trips_through_its_flag():
    for f in dataclasses.fields(TrainConfig):
        value = other_value(f)
        flag = "--" + f.name.replace("_", "-")
        argv = [flag] if value is True else [f"--no-{f.name.replace('_', '-')}"] if value is False else [flag, str(value)]
        cfg, explicit = parse_args(argv)
        assert getattr(cfg, f.name) == value and type(getattr(cfg, f.name)) is type(f.default), f.name
        assert explicit == {f.name}
        assert dataclasses.replace(cfg, **{f.name: f.default}) == TrainConfig()


def test_every_field_has_help_and_a_section():
    actions = {a.dest for a in build_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f.metadata["section"] and f.name in actions


def test_help_formats_every_field(capsys):
    """--help renders every help string (argparse %-formats them: a bare % would crash it)."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in out for f in dataclasses.fields(TrainConfig))


def test_preset_toml_flat_and_sectioned_keys_and_cli_precedence(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('epochs = 7\n[loss]\ntemperature = 0.05\nin_batch_negatives = false\n')
    cfg, _ = parse_args(["--config", str(preset), "--epochs", "2"])
    assert cfg.temperature == 0.05 and cfg.in_batch_negatives is False and cfg.epochs == 2


@pytest.mark.parametrize("text,msg", [
    ("epoch = 3\n", "unknown setting 'epoch'"),
    ("[optim]\ntemperature = 0.1\n", "unknown setting 'optim.temperature'"),
    ("epochs = 'three'\n", "epochs must be int"),
    ("precision = 'fp8'\n", "precision must be one of"),
    ("symmetric = 3\n", "symmetric must be true or false"),
])
def test_bad_presets_are_clear_errors(tmp_path, text, msg):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    with pytest.raises(UserError, match=msg):
        parse_args(["--config", str(preset)])


def test_unknown_flag_and_bad_type_are_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--learning-rate", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --learning-rate" in capsys.readouterr().err
    with pytest.raises(UserError, match="--lr: lr must be float"):
        parse_args(["--lr", "fast"])
    with pytest.raises(UserError, match="epochs must be int"):
        parse_args(["--epochs", "1.5"])
    cfg, _ = parse_args(["--lr", "1"])  # nanoGPT's `--learning_rate=1` trap: an int is a fine float
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
