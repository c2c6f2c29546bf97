"""Typed configs: YAML + overrides, every problem reported at once, resolved config round-trips."""
from __future__ import annotations

import pytest

from lbr_ray.config import config_from_dict, load_config, to_dict, to_yaml
from lbr_ray.errors import ConfigError


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["gr_cl.temperature=0.05", "data.types=[qa]"])
    assert cfg.gr_cl.temperature == 0.05 and cfg.data.types == ("qa",)
    assert config_from_dict(to_dict(cfg)) == cfg
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_all_problems_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["bottleneck.ratio=0", "foo.bar=1", "gr_cl.lr=abc", "run.variant=xx",
                           "model.attn_implementation=flash", "gr_cl.length_groups=-1"])
    msg = str(info.value)
    for part in ("bottleneck.ratio (R) must be > 0", "unknown key foo", "gr_cl.lr='abc' should be float",
                 "run.variant='xx'", "model.attn_implementation='flash' is not one of ['sdpa', 'eager']",
                 "gr_cl.length_groups must be >= 0"):
        assert part in msg


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: x\n  lora: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)


def test_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["gr_cl.temperature"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config("nope.yaml")


def test_real_model_configs_are_valid():
    import glob

    files = sorted(glob.glob("configs/**/*.yaml", recursive=True)) + ["benchmarks/gpu_suite.yaml"]  # GPU only
    assert "configs/qwen2.5-0.5b-medical.yaml" in files
    for f in files:
        if "/tune" not in f and "/eval" not in f:
            load_config(f)
