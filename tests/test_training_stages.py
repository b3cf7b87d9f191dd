"""The training stages end to end at smoke sizes: pretraining of every stand-in, then NP-Edit."""

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def pretrained(smoke_standins):
    return smoke_standins


@pytest.fixture(scope="module")
def data(smoke_data):
    return smoke_data


def test_pretrain_writes_every_part_in_hub_layout(pretrained):
    from nb_edit.flow.pipeline import load_pipeline
    from nb_edit.models.vlm.judge import VLMJudge
    from nb_edit.standins.editors import PretrainConfig

    for part in ("teacher", "clean", "noisy", "judge"):
        made = json.loads((pretrained / part / "made_by.json").read_text())
        assert made["command"] == "make pretrain" and made["steps"] > 0
    backbone = {"unet": "unet", "dit": "transformer"}[PretrainConfig().backbone]
    assert (pretrained / "teacher" / backbone / "diffusion_pytorch_model.safetensors").exists()
    pipe = load_pipeline(pretrained / "clean")
    out = pipe.edit(np.zeros((2, 32, 32, 3), np.uint8), ["do nothing", "make the red circle blue"], steps=2)
    assert out.shape == (2, 32, 32, 3)
    assert type(VLMJudge.from_pretrained(pretrained / "judge", device="cpu").model).__name__ == "LlavaForConditionalGeneration"
    metrics = json.loads((pretrained / "pretrain_metrics.json").read_text())
    assert set(metrics) == {"teacher", "clean", "noisy", "judge"}


def test_an_editor_trains_its_text_encoder_only_when_asked(pretrained, tmp_path):
    from safetensors.torch import load_file

    from nb_edit.standins.editors import PretrainConfig, train_supervised_editor

    def encoder(folder):
        return load_file(next((folder / "text_encoder").glob("*.safetensors")))

    teacher = encoder(pretrained / "teacher")
    for tune in (False, True):
        cfg = PretrainConfig.for_profile("smoke", tune_text_encoder=tune)
        out = tmp_path / f"tuned_{tune}"
        out.mkdir()
        train_supervised_editor(cfg, pretrained / "teacher", out, tmp_path / f"ckpt_{tune}", noisy=False)
        changed = [k for k, v in encoder(out).items() if not torch.equal(v, teacher[k])]
        assert bool(changed) == tune, (tune, changed[:3])


def test_pretrain_skips_what_is_made(pretrained, capsys):
    from nb_edit.standins import pretrain

    pretrain.run(parts=["teacher"], profile="smoke", root=pretrained)
    assert "already made" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["full", "vlm_only", "no_unroll"])
def test_npedit_trains_without_targets(pretrained, data, tmp_path, variant):
    from nb_edit.methods.npedit.train import NPEditConfig, train_npedit

    cfg = NPEditConfig.for_profile("smoke", variant=variant, teacher_id=str(pretrained / "teacher"),
                                   judge_id=str(pretrained / "judge"))
    pipe, history = train_npedit(cfg, data["unpaired"], tmp_path / "ckpt")
    assert len(history) == cfg.copy_warmup_steps + cfg.steps
    last = history[-1]
    assert {"loss_vlm", "grad_vlm", "curve_oracle_success", "curve_oracle_followed", "curve_oracle_preserved",
            "curve_judge_yes"} <= set(last)
    assert ("loss_dmd" in last) == (variant != "vlm_only")
    assert all(h["skipped"] == 0 for h in history)


def test_npedit_copy_warmup_comes_first_and_reads_sources_only(pretrained, data, tmp_path):
    from nb_edit.methods.npedit.train import NPEditConfig, NPEditTrainer, train_npedit, warmup_key

    cfg = NPEditConfig.for_profile("smoke", teacher_id=str(pretrained / "teacher"), judge_id=str(pretrained / "judge"),
                                   copy_warmup_steps=2, steps=1)
    _, history = train_npedit(cfg, data["unpaired"], tmp_path / "ckpt")  # unpaired data: no target exists
    assert len(history) == 3
    assert all("loss_copy" in h and "loss_vlm" not in h for h in history[:2])
    assert "loss_vlm" in history[2] and "loss_copy" not in history[2] and history[2]["step"] == 2

    # the ablations share one warm-up: a second variant resumes it instead of training it again
    other = cfg.replace(variant="vlm_only")
    assert warmup_key(other) == warmup_key(cfg)
    shared = tmp_path / "warmup"
    first = NPEditTrainer(cfg, data["unpaired"]).fit(tmp_path / "a", progress=False, warmup_dir=shared)
    trainer, calls = NPEditTrainer(other, data["unpaired"]), []
    copy_step = trainer.copy_step
    trainer.copy_step = lambda batch, step: calls.append(step) or copy_step(batch, step)
    second = trainer.fit(tmp_path / "b", progress=False, warmup_dir=shared)
    assert calls == [] and [h["loss_copy"] for h in second[:2]] == [h["loss_copy"] for h in first[:2]]
    assert "loss_vlm" in second[2] and "loss_dmd" not in second[2]  # its own main stage (VLM only)

    # the warm-up alone (the notebook's "after warm-up" row) loads the shared one: same weights, no step
    from nb_edit.models.lora import lora_parameters

    alone, calls = NPEditTrainer(cfg, data["unpaired"]), []
    fresh = [p.detach().clone() for p in lora_parameters(alone.model, "generator")]
    copy_step = alone.copy_step
    alone.copy_step = lambda batch, step: calls.append(step) or copy_step(batch, step)
    assert [h["loss_copy"] for h in alone.warm_up(shared, progress=False)] == [h["loss_copy"] for h in first[:2]]
    loaded = [p.detach() for p in lora_parameters(alone.model, "generator")]
    assert calls == [] and any(not torch.equal(a, b) for a, b in zip(fresh, loaded))
    with pytest.raises(ValueError, match="copy_warmup_steps"):
        NPEditTrainer(cfg.replace(copy_warmup_steps=0), data["unpaired"]).warm_up(tmp_path / "none")


def test_flowgrpo_baseline_starts_from_npedit_warmup_with_as_many_edits(pretrained, data, tmp_path, monkeypatch):
    """NP-Edit's Flow-GRPO baseline on equal terms: the same judge, the editor after NP-Edit's copy
    warm-up as its start (exported once, read back by path), as many edited images as NP-Edit's
    main stage, trained on NP-Edit's unpaired instructions."""
    from nb_edit import world
    from nb_edit.evaluation import harness
    from nb_edit.flow.pipeline import load_pipeline
    from nb_edit.methods import registry
    from nb_edit.methods.mtrl.train import train_mtrl
    from nb_edit.methods.npedit.train import NPEditConfig, NPEditTrainer, shared_warmup_dir, warmup_editor_dir

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    npe = NPEditConfig.for_profile("smoke", teacher_id=str(pretrained / "teacher"), judge_id=str(pretrained / "judge"),
                                   copy_warmup_steps=2, steps=3, batch_size=2)
    cfg, folder = registry.flowgrpo_baseline(npe, data, progress=False)
    start = warmup_editor_dir(npe, data["root"])
    assert (cfg.algorithm, cfg.n_turns, cfg.policy_id, cfg.judge_id) == ("grpo", 1, str(start), npe.judge_id)
    assert cfg.sampling_steps == npe.sampling_steps and cfg.seed == npe.seed
    per_rollout, rollouts = cfg.groups_per_step * cfg.group_size, cfg.steps // cfg.updates_per_rollout
    assert cfg.steps % cfg.updates_per_rollout == 0
    assert rollouts * per_rollout >= npe.steps * npe.batch_size > (rollouts - 1) * per_rollout

    # the same start: the exported folder edits exactly as NP-Edit's generator right after its warm-up
    warm = NPEditTrainer(npe, data["unpaired"])
    warm.warm_up(shared_warmup_dir(npe, data["root"]), progress=False)
    edits = harness.test_edits(data["test"])[:4]
    sources = harness.render_sources(edits, world.WorldConfig.from_dict(npe.world))
    instructions = [e.instruction for e in edits]
    ours = harness.run_editor(warm.edit_pipeline(), sources, instructions, steps=2, seed=0)
    exported = harness.run_editor(load_pipeline(start, device="cpu"), sources, instructions, steps=2, seed=0)
    assert np.abs(ours.astype(int) - exported.astype(int)).max() <= 1
    assert registry.flowgrpo_baseline(npe, data, progress=False) == (cfg, folder)  # found again, not re-exported

    _, history = train_mtrl(cfg, data["unpaired"], folder, progress=False)
    assert len(history) == cfg.steps and all("reward_if" in h for h in history)


def test_npedit_refuses_paired_data(pretrained, data, tmp_path):
    from nb_edit.methods.npedit.train import NPEditConfig, train_npedit

    cfg = NPEditConfig.for_profile("smoke", teacher_id=str(pretrained / "teacher"), judge_id=str(pretrained / "judge"))
    with pytest.raises(AssertionError, match="without pairs"):
        train_npedit(cfg, data["paired"], tmp_path / "ckpt")


def test_npedit_rejects_unknown_variant():
    from nb_edit.methods.npedit.train import NPEditConfig

    with pytest.raises(ValueError, match="variant='dmd'.*full, dmd_only"):
        NPEditConfig.for_profile("tiny", variant="dmd")


@pytest.mark.bad_input
def test_npedit_skips_and_counts_an_unreadable_source(data, tmp_path):
    import shutil

    from nb_edit.core.validation import SkipCounter
    from nb_edit.data.store import read_dataset
    from nb_edit.methods.npedit.train import load_unpaired

    folder = tmp_path / "unpaired"
    shutil.copytree(data["root"] / "unpaired", folder)
    dataset = read_dataset(folder, counter=SkipCounter(threshold_fraction=0.5, min_seen=1))
    broken = dataset.image_path(0)
    broken.write_bytes(b"not a png")  # every record of this reference image becomes unreadable
    n_broken = sum(1 for i in range(len(dataset)) if dataset.image_path(i) == broken)
    sources, records = load_unpaired(dataset)
    assert len(records) == len(sources) == len(dataset) - n_broken
    assert dataset.counter.reasons["unreadable_source"] == n_broken
    assert dataset.metrics("data.unpaired")["data.unpaired.skipped"] == n_broken


def test_remade_part_replaces_the_old_one_whole(tmp_path):
    from nb_edit.models.loaders import resolve_backbone
    from nb_edit.standins import pretrain

    stale = tmp_path / "teacher" / "transformer"  # what a part made with another backbone left
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    pretrain.run(parts=["teacher"], profile="smoke", root=tmp_path, force=True)
    assert not stale.exists() and (tmp_path / "teacher" / "made_by.json").exists()
    assert resolve_backbone(tmp_path / "teacher") in ("unet", "dit")
    assert not list(tmp_path.glob(".*.partial"))


def test_pretrain_cli_set_reaches_the_part_config_and_is_checked(tmp_path, monkeypatch, capsys):
    from nb_edit.cli import main

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pretrained"
    assert main(["pretrain", "--profile", "smoke", "--only", "teacher", "--to", str(root), "--world", "small",
                 "--set", "unet_blocks=[8,16,16]", "--set", "steps=3"]) == 0
    made = json.loads((root / "teacher" / "made_by.json").read_text())
    assert made["config"]["unet_blocks"] == [8, 16, 16] and made["steps"] == 3
    assert made["config"]["world"]["edit_types"] == list(__import__("nb_edit").world.preset("small").edit_types)
    capsys.readouterr()
    assert main(["pretrain", "--profile", "smoke", "--to", str(root), "--set", "qa_steps=3"]) != 0
    assert "--set qa_steps=3: PretrainConfig has no setting 'qa_steps'" in capsys.readouterr().err
    assert main(["pretrain", "--profile", "smoke", "--to", str(root), "--judge-set", "editor_steps=3"]) != 0
    assert "--judge-set editor_steps=3: JudgeConfig has no setting" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--world toy"):
        main(["pretrain", "--profile", "smoke", "--to", str(root), "--set", "world={}"])


def test_judge_feedback_pool_asks_the_editors_outputs_and_every_score_question(pretrained, tmp_path, monkeypatch):
    from nb_edit.data.judge_qa import SCORE_KINDS
    from nb_edit.standins.judge import JudgeConfig, build_feedback_pool

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    cfg = JudgeConfig.for_profile("smoke", score_share=1.0, chain_share=0.0, editor_share=0.5, presence_share=0.0)
    pool = build_feedback_pool(cfg, 40, seed=0, editors_root=pretrained)
    origin, kinds = pool.meta["origin"], pool.meta["kind"]
    assert origin.count("editor") == 20 and len(origin) == 40
    assert set(kinds) == set(SCORE_KINDS)  # score_share=1: every edit question asks for a score
    assert all(a in "012345" and len(a) == 1 for a in pool.meta["answer"])

    with pytest.raises(FileNotFoundError, match="make pretrain"):
        build_feedback_pool(cfg, 8, seed=0, editors_root=tmp_path / "nothing")


def test_judge_hard_stage_runs_last_on_fresh_questions_with_stage_4_mixed_in(pretrained, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nb_edit.standins.judge import JudgeConfig, build_hard_pool, build_pool, concat_pools

    made = json.loads((pretrained / "judge" / "made_by.json").read_text())
    cfg = JudgeConfig.for_profile("smoke")
    stages = cfg.perception_steps + cfg.align_steps + cfg.qa_steps + cfg.feedback_steps
    assert cfg.hard_steps > 0 and made["steps"] == stages + cfg.hard_steps  # the smoke stand-in ran stage 5

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    hard, stage3 = build_hard_pool(cfg, 12, seed=0), build_pool(cfg, 12, seed=0)
    again = build_hard_pool(cfg, 12, seed=0)
    assert again.hit and torch.equal(again.tensors["output"], hard.tensors["output"])
    assert not torch.equal(hard.tensors["source"], stage3.tensors["source"])  # a stream of its own
    feedback = SimpleNamespace(tensors=stage3.tensors, meta={**stage3.meta, "origin": ["editor"] * 12})
    both = concat_pools(hard, feedback)
    assert both.tensors["source"].shape[0] == 24 and len(both.meta["question"]) == 24
    assert both.meta["origin"] == ["synthetic"] * 12 + ["editor"] * 12
    assert both.meta["answer"][12:] == stage3.meta["answer"] and both.meta["kind"][:12] == hard.meta["kind"]


@pytest.mark.bad_input
def test_pretrain_judge_refuses_to_start_before_the_editors(tmp_path, monkeypatch):
    from nb_edit.standins import pretrain

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="--only clean,noisy"):
        pretrain.run(parts=["judge"], profile="smoke", root=tmp_path / "pretrained")
    assert not (tmp_path / "pretrained" / ".judge.partial").exists()  # nothing half-made is left behind


def test_evaluate_pool_reads_each_score_question_over_its_own_digits(monkeypatch):
    """A 1-5 question's expected score ignores the "0" token: here "0" takes almost all the mass,
    more of it the higher the label, so a 0-5 reading would rank the outputs backwards."""
    from types import SimpleNamespace

    from nb_edit.models.vlm.judge import VLMJudge, single_token_id
    from nb_edit.standins import judge as standin_judge
    from nb_edit.world import WorldConfig

    judge = VLMJudge.tiny("llava", standin_judge.judge_tokenizer(WorldConfig()), image_size=32, vision_layers=1,
                          text_layers=1)
    labels = [1, 2, 3, 4, 5, 2, 4, 5]
    n = len(labels)
    pool = SimpleNamespace(tensors={"source": torch.zeros(n, 32, 32, 3, dtype=torch.uint8),
                                    "output": torch.zeros(n, 32, 32, 3, dtype=torch.uint8)},
                           meta={"question": ["q"] * n, "answer": [str(v) for v in labels], "kind": ["if_score"] * n})

    def fake_logits(judge_, source, output, qs):
        logits = torch.full((len(qs), judge.model.config.text_config.vocab_size), -50.0)
        for row in range(len(qs)):
            label = labels[fake_logits.offset + row]
            logits[row, single_token_id(judge.tokenizer, "0")] = 20.0 + label
            logits[row, single_token_id(judge.tokenizer, str(label))] = 5.0
        fake_logits.offset += len(qs)
        return logits

    fake_logits.offset = 0
    monkeypatch.setattr(standin_judge, "qa_logits", fake_logits)
    result = standin_judge.evaluate_pool(judge, pool, batch=3)
    assert result["acc_if_score"] == 0.0  # argmax is "0", never the label
    assert result["spearman_if_score"] == pytest.approx(1.0)


def test_competence_measures_what_a_folder_holds_with_intervals(pretrained, tmp_path, capsys):
    from nb_edit import world
    from nb_edit.cli import main
    from nb_edit.core.config import RunSettings
    from nb_edit.standins import competence

    world_name = RunSettings.for_profile("smoke").world  # the world the smoke stand-ins were made for
    world_cfg = world.preset(world_name)
    figures = competence.measure(pretrained, world_cfg, n=12, n_boot=50)
    for name in ("copy", "supervised_clean", "supervised_noisy"):
        key = f"models.{name}.oracle_success"
        assert figures[f"{key}.ci_low"] <= figures[key] <= figures[f"{key}.ci_high"], name
    assert figures["models.copy.oracle_preserved"] == 1.0  # the copy changes nothing
    edits = competence.held_out_edits(world_cfg, 12)
    assert {k.rsplit(".", 1)[1] for k in figures if ".per_type." in k and k.startswith("models.copy")} == \
        {e.edit_type for e in edits}
    assert 0.0 <= figures["models.teacher.caption_match"] <= 1.0 and "judge.acc_followed" in figures
    again = competence.held_out_edits(world_cfg, 12)  # a fixed stream: the same edits every time
    assert [json.dumps(e.to_dict(), default=float) for e in again] == [json.dumps(e.to_dict(), default=float)
                                                                        for e in edits]

    with pytest.raises(ValueError, match="made for"):  # stand-ins of the rich world scored on the small one
        competence.measure(pretrained, world.preset("small"), n=4)
    with pytest.raises(FileNotFoundError, match="pretrain --to"):
        competence.measure(tmp_path, world_cfg, n=4)
    out = tmp_path / "figures.json"
    assert main(["competence", "--from", str(pretrained), "--world", world_name, "--n", "8",
                 "--threads", "1", "--json", str(out)]) == 0
    assert "models.copy.oracle_success" in json.loads(out.read_text())
    assert "models.teacher.caption_match:" in capsys.readouterr().out
