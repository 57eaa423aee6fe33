"""Config inheritance (``extends:``), ``${VAR:-default}`` expansion, and the shipped configs built on them."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, assert_clean_error, run_cli

from medseg.core.config import load_config, read_config, to_dict
from medseg.core.errors import ConfigError, InputNotFoundError

BASE = """\
name: base
labels: {0: background, 1: a, 2: b}
data:
  root: /data/base
  val_fraction: 0.2
  seed: 3
patch:
  size: [48, 64, 48]
augment:
  flip_axes: [0, 1, 2]
train:
  epochs: 200
  lr: 0.002
  output_dir: runs/base
"""

SHIPPED = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "benchmarks" / "configs").glob("*.yaml")])


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_child_overrides_a_nested_key_and_inherits_the_rest(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ndata:\n  seed: 7\ntrain:\n  epochs: 5\n")
    cfg = load_config(child)
    assert cfg.data.seed == 7 and cfg.train.epochs == 5  # the child's keys win
    assert cfg.data.root == "/data/base" and cfg.data.val_fraction == 0.2  # siblings in the same section stay
    assert cfg.train.lr == 0.002 and cfg.train.output_dir == "runs/base"
    assert cfg.name == "base" and cfg.labels == {0: "background", 1: "a", 2: "b"}
    assert "extends" not in read_config(child)


def test_lists_are_replaced_not_merged(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\naugment:\n  flip_axes: [0]\npatch:\n  size: [40, 56, 40]\n")
    cfg = load_config(child)
    assert cfg.augment.flip_axes == [0]
    assert cfg.patch.size == [40, 56, 40]


def test_a_chain_of_three_with_paths_relative_to_each_file(tmp_path):
    write(tmp_path / "configs" / "base.yaml", BASE)
    write(tmp_path / "bench" / "configs" / "middle.yaml",
          "extends: ../../configs/base.yaml\ntrain:\n  epochs: 50\n  lr: 0.01\n")
    leaf = write(tmp_path / "bench" / "configs" / "leaf.yaml", "extends: middle.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(leaf)
    assert cfg.train.epochs == 9  # the leaf over the middle
    assert cfg.train.lr == 0.01  # the middle over the base
    assert cfg.data.seed == 3 and cfg.train.output_dir == "runs/base"  # the base


def test_a_circular_chain_is_a_config_error_naming_the_file(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circle") as info:
        read_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(info.value) and "extends" in str(info.value)
    write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml"):
        read_config(tmp_path / "self.yaml")


def test_a_missing_base_is_input_not_found(tmp_path):
    child = write(tmp_path / "child.yaml", "extends: nowhere/base.yaml\ntrain:\n  epochs: 5\n")
    with pytest.raises(InputNotFoundError, match="config file not found") as info:
        load_config(child)
    assert "nowhere/base.yaml" in str(info.value)


def test_environment_default_and_value(tmp_path, monkeypatch):
    path = write(tmp_path / "c.yaml", "data:\n  root: ${MEDSEG_DATA:-x}/hippocampus\n")
    monkeypatch.delenv("MEDSEG_DATA", raising=False)
    assert read_config(path)["data"]["root"] == "x/hippocampus"
    monkeypatch.setenv("MEDSEG_DATA", "/mnt/data")
    assert read_config(path)["data"]["root"] == "/mnt/data/hippocampus"
    assert load_config(path).data.root == "/mnt/data/hippocampus"


def test_an_unset_variable_without_default_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSEG_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path / "c.yaml", "data:\n  root: ${MEDSEG_TEST_UNSET_VAR}/hippocampus\n")
    with pytest.raises(ConfigError, match="MEDSEG_TEST_UNSET_VAR is not set") as info:
        read_config(path)
    message = str(info.value)
    assert "c.yaml" in message
    assert "export MEDSEG_TEST_UNSET_VAR=" in message and "${MEDSEG_TEST_UNSET_VAR:-default}" in message


def test_set_overrides_beat_the_child_the_base_and_the_environment(tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", BASE.replace("root: /data/base", "root: ${MEDSEG_DATA:-/default}/base"))
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  epochs: 5\n")
    monkeypatch.setenv("MEDSEG_DATA", str(tmp_path / "from_env"))
    assert read_config(child)["data"]["root"] == f"{tmp_path}/from_env/base"
    data = read_config(child, ["data.root=/x", "train.epochs=2", "data.seed=11"])
    assert data["data"]["root"] == "/x" and data["train"]["epochs"] == 2 and data["data"]["seed"] == 11
    assert data["data"]["val_fraction"] == 0.2  # still inherited
    # the real CLI, once: the dataset it refuses is the --set one, not the environment's or the base's
    proc = run_cli("train", child, "--set", f"data.root={tmp_path}/from_set",
                   "--set", f"train.output_dir={tmp_path}/run")
    assert_clean_error(proc, "dataset folder not found", f"{tmp_path}/from_set")
    assert "from_env" not in proc.stderr and "/default" not in proc.stderr


def test_shipped_configs_are_found():
    names = {p.name for p in SHIPPED}
    assert {"hippocampus.yaml", "hippocampus_auto.yaml", "shapes_2d.yaml", "voc_2d.yaml"} <= names
    assert {"hippocampus_cv.yaml", "hippocampus_cv_dynunet.yaml", "hippocampus_cv_all_w24.yaml"} <= names
    assert len(SHIPPED) >= 12


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_with_the_default_data_folder(path, monkeypatch):
    monkeypatch.delenv("MEDSEG_DATA", raising=False)
    cfg = load_config(path)  # extends: resolved, ${...} expanded, validated; plan: auto kept as written
    assert "${" not in str(to_dict(cfg))
    if cfg.name == "hippocampus":
        assert cfg.data.root == "../shared/data/hippocampus"
        assert cfg.labels == {0: "background", 1: "anterior", 2: "posterior"}
        assert cfg.augment.flip_axes == [0]  # a front-back mirror would swap anterior and posterior


def test_benchmark_recipes_are_a_base_plus_a_few_lines():
    recipes = sorted((REPO / "benchmarks" / "configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        assert "extends" in raw, path
        assert (path.parent / raw["extends"]).is_file(), path
        assert "labels" not in raw and "root" not in raw.get("data", {}), path  # inherited from configs/hippocampus.yaml


def test_a_recipe_still_resolves_to_the_config_its_record_was_trained_with():
    """benchmarks/records/cv_w24 was trained with the recipe before it became a base plus a few lines."""
    record = REPO / "benchmarks" / "records" / "cv_w24" / "fold_2" / "config.yaml"
    cfg = load_config(REPO / "benchmarks" / "configs" / "hippocampus_cv_all_w24.yaml",
                      ["data.folds=5", "data.fold=2", "train.output_dir=runs/cv_w24/fold_2"])
    assert to_dict(cfg) == to_dict(load_config(record))
