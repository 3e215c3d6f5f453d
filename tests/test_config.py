import pytest

from ditpipe.config import Config, ConfigError, describe, load_config, to_dict
from tests.conftest import committed


def test_committed_params_yaml_equals_defaults(tmp_path):
    """The committed params.yaml is the defaults (a user's edits to it, the DVC workflow, do not fail this)."""
    (tmp_path / "params.yaml").write_bytes(committed("params.yaml"))
    assert to_dict(load_config(tmp_path / "params.yaml")) == to_dict(Config())


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 30
    assert all(help for _, _, help in rows), [k for k, _, h in rows if not h]


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(None, ["data.resolution=64", "data.source=/x/y", "vae.block_out_channels=[8, 16]",
                             "latents.flip=true", "vae.lr=1e-4"])
    assert cfg.data.resolution == 64 and cfg.data.source == "/x/y"
    assert cfg.vae.block_out_channels == (8, 16)
    assert cfg.latents.flip is True and cfg.vae.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.resolutoin=64", "unknown key data.resolutoin"),
        ("nosuch.key=1", "unknown key nosuch"),
        ("data.resolution=abc", "data.resolution must be an integer, got 'abc'"),
        ("data.resolution=100", "data.resolution must be a positive multiple of 8, got 100"),
        ("latents.dtype=float64", "latents.dtype must be one of float32, float16, bfloat16; got 'float64'"),
        ("latents.flip=maybe", "latents.flip must be true or false, got 'maybe'"),
        ("vae.block_out_channels=[8, x]", "vae.block_out_channels[1] must be an integer"),
        ("data.val_fraction=1.5", "data.val_fraction must be in [0.0, 1.0)"),
        ("data.background=notacolour", "data.background must be a PIL colour"),
        ("text.device=tpu", "text.device must be auto, cpu, cuda"),
        ("model.mlp_conv=4", "model.mlp_conv must be 0 (none) or an odd kernel size such as 3, got 4"),
        ("model.caption_layers=-1", "model.caption_layers must be >= 0, got -1"),
        ("data=3", "data must be a mapping"),
        ("novalue", "--set expects key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_bad_params_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("data:\n  count: 0\n")
    with pytest.raises(ConfigError, match="data.count must be >= 1, got 0"):
        load_config(bad)
