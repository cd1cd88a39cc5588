"""Per-dataset defaults (issue 25): a dataset plugin declares the settings that fit it (max_length, max_new_tokens,
task, metric); they apply unless the user set the key, and the run's config.toml records them. Every bundled
dataset builds with ``--set data.dataset=NAME`` alone (and tiny-llama for the generation ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import config, registry
from fedlora.errors import ConfigError


def test_a_dataset_brings_the_settings_that_fit_it_unless_the_user_set_them(tmp_path: Path) -> None:
    cfg = config.load(None, ["model.name=tiny-llama", "data.dataset=math-word"])
    assert (cfg.train.max_length, cfg.train.max_new_tokens) == (256, 256)
    resolved = cfg.resolved()
    assert (resolved.data.task, resolved.data.metric) == ("generation", "final-number")
    (tmp_path / "c.toml").write_text(config.dumps(resolved))
    again = config.load(tmp_path / "c.toml")
    assert (again.train.max_length, again.train.max_new_tokens, again.data.metric) == (256, 256, "final-number")
    # set by the user: kept, even at the schema's own default value, from --set or from a file
    assert config.load(None, ["model.name=tiny-llama", "data.dataset=math-word",
                              "train.max_length=64"]).train.max_length == 64
    (tmp_path / "u.toml").write_text('[model]\nname = "tiny-llama"\n[data]\ndataset = "python-functions"\n'
                                     '[train]\nmax_new_tokens = 100\n')
    user = config.load(tmp_path / "u.toml")
    assert (user.train.max_length, user.train.max_new_tokens) == (512, 100)
    # the default demo's dataset declares nothing: the schema's defaults
    assert config.load(None, []).train.max_length == 64
    assert config.load(None, ["data.dataset=rotten-tomatoes-gen", "model.name=tiny-llama"]).train.max_length == 128


def test_defaults_on_top_of_a_base_config_keep_what_the_base_set() -> None:
    base = config.load(None, ["model.name=tiny-llama", "data.dataset=math-word", "train.max_length=200"])
    assert config.from_dict({"method": {"name": "fedit"}}, base=base).train.max_length == 200
    switched = config.from_dict({"data": {"dataset": "rotten-tomatoes-gen"}}, base=config.load(None, [
        "model.name=tiny-llama"]))
    assert switched.train.max_length == 128  # the base left max_length at the schema default


def test_metric_choices_are_checked_against_the_task_and_the_dataset() -> None:
    with pytest.raises(ConfigError, match="data.metric = 'final-number' does not score a classification task; use "
                                          "'auto' or 'accuracy'"):
        config.load(None, ["data.metric=final-number"]).resolved()
    with pytest.raises(ConfigError, match="data.dataset = 'python-functions' is scored by 'humaneval' only"):
        config.load(None, ["model.name=tiny-llama", "data.dataset=python-functions",
                           "data.metric=exact-match"]).resolved()
    with pytest.raises(ConfigError, match=r"data.metric = 'humaneval' is scored by the dataset that defines it "
                                          r"\(python-functions\), not by data.dataset = 'rotten-tomatoes-gen'"):
        config.load(None, ["model.name=tiny-llama", "data.dataset=rotten-tomatoes-gen",
                           "data.metric=humaneval"]).resolved()
    gen = config.load(None, ["model.name=tiny-llama", "data.dataset=rotten-tomatoes-gen",
                             "data.metric=final-number"]).resolved()
    assert gen.data.metric == "final-number"


BUNDLED = [name for name, source in registry.DATASETS.items() if source.path != "required"]


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_dataset_builds_with_its_name_alone(name: str) -> None:
    from fedlora.experiment import build

    source = registry.DATASETS.lookup(name)
    sets = [f"data.dataset={name}"] + (["model.name=tiny-llama"] if source.task == "generation" else [])
    exp = build(config.load(None, sets))  # tokenizes every example at the dataset's max_length
    assert exp.config.train.max_length == (source.max_length or 64)
    assert exp.config.train.max_new_tokens == source.max_new_tokens
    assert exp.config.data.metric == (source.metric or ("exact-match" if source.task == "generation" else "accuracy"))
    assert len(exp.clients) == 3 and len(exp.split.global_test) > 0


def test_the_bundled_list_is_what_ships() -> None:
    assert BUNDLED == ["rotten-tomatoes", "bbc-news", "rotten-tomatoes-gen", "bbc-news-gen", "math-word",
                       "python-functions"]
