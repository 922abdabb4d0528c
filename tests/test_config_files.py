"""pkm.config_files.read_mapping_file: the run config's and the sweep grid's reader."""
from __future__ import annotations

import pytest

from finetune.sweep import load_grid_file
from pkm.config_files import read_mapping_file
from pretrain.config import load_config


def test_json_and_yaml_give_the_same_mapping(tmp_path):
    (tmp_path / "a.json").write_text('{"train": {"max_steps": 5}, "optim": {"betas": [0.9, 0.98]}}')
    (tmp_path / "a.yaml").write_text("train:\n  max_steps: 5\noptim:\n  betas: [0.9, 0.98]\n")
    assert read_mapping_file(str(tmp_path / "a.json")) == read_mapping_file(str(tmp_path / "a.yaml"))
    assert load_config(str(tmp_path / "a.yaml")).train.max_steps == 5
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping_file(str(tmp_path / "empty.yaml")) == {}


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "config file '.*missing.json' does not exist"),
    ("cut.json", '{"train": {"max_steps": 5', "config file '.*cut.json' is not valid JSON"),
    ("bad.yaml", "train: [1, 2\n", "config file '.*bad.yaml' is not valid YAML"),
    ("list.json", "[1, 2]", "config file '.*list.json' must hold a mapping at the top level, got list"),
])
def test_errors_name_the_file(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_mapping_file(str(tmp_path / name))


def test_the_sweep_grid_uses_it(tmp_path):
    (tmp_path / "grid.yaml").write_text("tasks: [sst2]\nlearning_rates: [1.0e-5]\nseeds: [1]\n")
    assert load_grid_file(str(tmp_path / "grid.yaml"))["lrs"] == [1e-5]
    (tmp_path / "grid.json").write_text('["sst2"]')
    with pytest.raises(ValueError, match="grid file '.*grid.json' must hold a mapping"):
        load_grid_file(str(tmp_path / "grid.json"))
