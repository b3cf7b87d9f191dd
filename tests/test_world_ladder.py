"""The ladder of worlds reaches every layer: the run's settings name the world, the datasets are
drawn from it, the trainers' configs carry it, and stand-ins made for another world are refused."""

import json

import pytest

from nb_edit import world
from nb_edit.core.config import RunSettings
from nb_edit.core.validation import BadInputError
from nb_edit.methods import registry
from nb_edit.standins.pretrain import check_world, made_for


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from nb_edit.data.world_datasets import shapesworld

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NB_EDIT_CACHE", str(tmp_path_factory.mktemp("small_cache")))
        return shapesworld(RunSettings.for_profile("smoke", world="small"))


def test_the_profile_names_the_world_and_the_datasets_are_drawn_from_it(small_data):
    assert RunSettings.for_profile("tiny").world in world.WORLDS
    small = world.preset("small")
    assert small_data["world_cfg"] == small
    for name in ("test", "paired", "unpaired"):
        types = {json.loads(r.edit_json)["edit_type"] for r in small_data[name] if r.edit_json}
        assert types and types <= set(small.edit_types), (name, types)
    for record in small_data["test"]:
        assert len(json.loads(record.edit_json)["source"]["objects"]) <= small.max_objects
    with pytest.raises(ValueError, match="unknown; choose one of"):
        from nb_edit.data.world_datasets import shapesworld

        shapesworld(RunSettings.for_profile("smoke", world="huge"))


def test_trainer_configs_carry_the_datas_world(small_data):
    small = world.preset("small").to_dict()
    assert all(c.world == small for c in registry.npedit_configs("smoke", world_cfg=small_data["world_cfg"]).values())
    assert all(c.world == small for c in registry.mtrl_configs("smoke", world_cfg=small_data["world_cfg"]).values())
    # the default world leaves a run's name (its cache folder) as it was before the setting existed
    rich_cfg = registry.stage_config("npedit", "smoke")
    assert "world" not in rich_cfg.identity()
    assert "world" in registry.stage_config("npedit", "smoke", world_cfg=world.preset("small")).identity()
    found = registry.trained_runs("smoke", 0, small_data, stages=("npedit", "mtrl"))
    assert found and all(t.config.world == small for t in found)


@pytest.mark.bad_input
def test_a_config_of_another_world_is_refused_before_training(small_data):
    rich_cfg = registry.stage_config("mtrl", "smoke")  # the rich world, but the data are the small world's
    with pytest.raises(BadInputError, match="differs from the world of the data") as error:
        registry.train_stage("mtrl", rich_cfg, small_data)
    assert "world_cfg=data['world_cfg']" in str(error.value)


@pytest.mark.bad_input
def test_standins_made_for_another_world_are_refused(smoke_standins, tmp_path):
    made = made_for(smoke_standins / "clean")
    assert made == world.preset(RunSettings.for_profile("smoke").world)
    check_world(made, *(smoke_standins / p for p in ("teacher", "clean", "noisy", "judge")))  # their own world
    with pytest.raises(BadInputError, match="made for the world 'rich'") as error:
        check_world(world.preset("small"), smoke_standins / "clean")
    assert "pretrain --world" in str(error.value) and "world_name='rich'" in str(error.value)
    # a folder that is not a stand-in (a user's own model, a hub id) is not checked
    (tmp_path / "own").mkdir()
    check_world(world.preset("small"), tmp_path / "own", "org/some-hub-model")
