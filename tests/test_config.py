import dataclasses
import math

import pytest

from bge.config import Bounded, Range, TrainConfig, build_parser, check_ranges, parse_args
from bge.errors import UserError


def other_value(f: dataclasses.Field):
    """A valid non-default value of the field's type."""
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != f.default)
    if f.metadata.get("items"):
        return {int: "8", float: "0.5"}[f.metadata["items"]]
    if isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, tuple):  # a list of paths (--data a.jsonl b.jsonl)
        return ("vx", "vy")
    step = 3 if isinstance(f.default, int) else 0.25
    if isinstance(f.default, (int, float)):
        return f.default + step if f.default + step in f.metadata["range"] else f.default - step
    return (f.default or "v") + "x"


def test_every_field_round_trips_through_its_flag():
    for f in dataclasses.fields(TrainConfig):
        value = other_value(f)
        flag = "--" + f.name.replace("_", "-")
        argv = [flag] if value is True else [f"--no-{f.name.replace('_', '-')}"] if value is False else \
            [flag, *value] if isinstance(value, tuple) else [flag, str(value)]
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


# ---- ranges: every number is checked before any work -----------------------------------------------------
NUMERIC = [f for f in dataclasses.fields(TrainConfig)
           if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) or f.metadata.get("items")]


def outside(rng: Range, kind: type) -> list:
    """Values just outside each finite end of the range (the end itself when it is open)."""
    step = 1 if kind is int else 1e-3
    values = []
    if math.isfinite(rng.lo):
        values.append(kind(rng.lo) if not rng.lo_closed else kind(rng.lo - step))
    if math.isfinite(rng.hi):
        values.append(kind(rng.hi) if not rng.hi_closed else kind(rng.hi + step))
    return values


def test_every_numeric_field_has_a_range_that_holds_its_default():
    """A new int/float field without range=... fails here (and so does a number hidden in a str field's list)."""
    assert len(NUMERIC) >= 40
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert isinstance(f.metadata["range"], Range), f"{f.name}: a numeric field needs opt(..., range=...)"
            assert f.default in f.metadata["range"], f.name
        if f.metadata.get("items"):
            assert isinstance(f.metadata["range"], Range), f.name


@pytest.mark.parametrize("f", NUMERIC, ids=[f.name for f in NUMERIC])
def test_a_value_outside_the_range_is_one_line_naming_flag_value_and_range(f):
    rng, flag = f.metadata["range"], "--" + f.name.replace("_", "-")
    kind = f.metadata.get("items") or type(f.default)
    values = outside(rng, kind)
    assert values, f"{f.name}: the range {rng} has no finite end to test"
    for v in values:
        text = f"1,{v}" if f.metadata.get("items") else str(v)
        with pytest.raises(UserError) as e:
            parse_args([flag, text])
        message = str(e.value)
        assert message.startswith(flag) and str(rng) in message and text in message and "\n" not in message, message
    # the same check guards presets and sweeps, which read values through the same conversion
    from bge.config import parse_setting
    with pytest.raises(UserError, match=f"must be in {rng}".replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_setting(f.name, values[0] if not f.metadata.get("items") else f"1,{values[0]}", "preset.toml")


@pytest.mark.parametrize("argv,message", [
    (["--val-ratio", "0.6", "--test-ratio", "0.6"], "must be below 1"),
    (["--val-ratio", "0.5", "--test-ratio", "0.5"], "must be below 1"),  # the boundary: no training item left
    (["--merge-sweep", "0.5", "--merge-ratio", "0.5"], "not both"),
    (["--kd-weight", "1", "--group-size", "1"], "needs --group-size 2 or more"),
    (["--distill-from", "teacher", "--matryoshka-dims", "16,8"], "cannot be combined"),
    (["--matryoshka-dims", "16,x"], "matryoshka_dims must be ints separated by commas"),
    (["--merge-sweep", ","], "merge_sweep must be floats separated by commas"),
])
def test_cross_field_checks(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_a_test_file_replaces_the_carved_test_share():
    cfg, _ = parse_args(["--val-ratio", "0.6", "--test-ratio", "0.6", "--test", "t.tsv"])
    assert cfg.val_ratio == 0.6


def test_range_intervals():
    r = Range.parse("[0, 1)")
    assert 0 in r and 0.5 in r and 1 not in r and -1e-9 not in r and float("nan") not in r
    r = Range.parse("(-inf, 1]")
    assert -1e9 in r and 1 in r and 1.0001 not in r
    with pytest.raises(ValueError):
        Range.parse("0..1")


def cli_parsers():
    import evaluate
    import sweep
    from bge import mine, score
    return {"evaluate.py": (evaluate.build_parser(), ["--data", "x"]),
            "bge.mine": (mine.build_parser(), ["--data", "x", "--out", "y"]),
            "bge.score": (score.build_parser(), ["--teacher", "t", "--data", "x", "--out", "y"]),
            "sweep.py": (sweep.build_parser(), ["preset.toml"])}


def test_every_numeric_flag_of_the_other_clis_has_a_range():
    """evaluate.py, bge.mine, bge.score and sweep.py: no flag is a bare int or float; each Bounded flag refuses a value
    outside its range with one line naming it (lists such as --ks and --range parse and check themselves)."""
    checked = 0
    for cli, (parser, required) in cli_parsers().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{cli} {action.option_strings}: give it a Bounded(type, range)"
            if not isinstance(action.type, Bounded):
                continue
            flag = action.option_strings[0]
            assert action.default is None or action.default in action.type.range, (cli, flag)
            for v in outside(action.type.range, action.type.kind):
                args = parser.parse_args([*required, flag, str(v)])
                with pytest.raises(UserError) as e:
                    check_ranges(parser, args)
                assert str(e.value) == f"{flag}: must be in {action.type.range}, got {v!r}", (cli, str(e.value))
                checked += 1
    assert checked >= 14
