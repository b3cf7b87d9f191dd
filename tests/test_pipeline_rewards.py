"""The inference pipeline, the reward interface (judge and oracle) and the evaluation harness."""

import numpy as np
import pytest
import torch

from nb_edit import world
from nb_edit.core.images import to_tensor
from nb_edit.evaluation import harness
from nb_edit.flow.pipeline import EditPipeline
from nb_edit.models.autoencoders import PixelAutoencoder
from nb_edit.models.editors import build_editor
from nb_edit.models.text import build_tiny_text_encoder
from nb_edit.models.tiny_configs import tiny_flux_config
from nb_edit.models.vlm import questions
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.rewards.single_turn import JudgeReward, OracleReward, removed_object
from nb_edit.standins.editors import world_tokenizer
from nb_edit.standins.judge import judge_tokenizer

CFG = world.WorldConfig()


@pytest.fixture(scope="module")
def edits():
    rng = np.random.default_rng(0)
    return [world.sample_edit_of_type(rng, CFG, kind) for kind in ("colour", "remove", "move", "noop")]


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    tok = world_tokenizer(CFG)
    return EditPipeline(build_editor("dit", tiny_flux_config()).eval(), build_tiny_text_encoder(tok).eval(),
                        PixelAutoencoder())


@pytest.fixture(scope="module")
def reward():
    return JudgeReward(VLMJudge.tiny("llava", judge_tokenizer(CFG), seed=0).freeze(), differentiable=True)


def test_pipeline_edit_is_deterministic_and_uint8(pipeline, edits):
    sources = harness.render_sources(edits, CFG)
    a = pipeline.edit(sources, [e.instruction for e in edits], steps=2, seed=3)
    b = pipeline.edit(sources, [e.instruction for e in edits], steps=2, seed=3)
    c = pipeline.edit(sources, [e.instruction for e in edits], steps=2, seed=4)
    assert a.dtype == np.uint8 and a.shape == sources.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    guided = pipeline.edit(sources, [e.instruction for e in edits], steps=2, seed=3, guidance=3.0)
    assert not np.array_equal(a, guided)  # the unconditional branch is really used
    assert pipeline.generate(["a red circle on a white background"], 32, steps=2).shape == (1, 32, 32, 3)


def test_removed_object_reads_the_instruction(edits):
    remove = next(e for e in edits if e.edit_type == "remove")
    obj = remove.source.objects[remove.obj_index]
    assert removed_object(remove.instruction, "remove").endswith(f"{obj.colour} {obj.shape}")
    assert removed_object(remove.instruction, "colour") is None


def test_judge_reward_gradient_reaches_the_output_and_remove_flips_target(reward, edits):
    sources = to_tensor(harness.render_sources(edits, CFG))
    outputs = sources.clone().requires_grad_(True)
    instructions, types = [e.instruction for e in edits], [e.edit_type for e in edits]
    logits = reward.question_logits(sources, outputs, instructions, types)
    yes, no = reward.judge.yes_no_logits([sources, outputs], [questions.present(removed_object(
        instructions[1], "remove"))] * len(edits))
    # the remove edit's verification target is "no" of the presence question
    assert torch.allclose(logits["verify_target"][1], no[1], atol=1e-5)
    assert torch.allclose(logits["verify_other"][1], yes[1], atol=1e-5)
    loss, stats = reward.npedit_loss(sources, outputs, instructions, types)
    delta = torch.stack([logits["verify_target"] - logits["verify_other"],
                         logits["identity_target"] - logits["identity_other"]], 1)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(delta).sum(1).mean(), atol=1e-5)
    loss.backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0
    assert 0 < stats["p_verify"] < 1


def test_reward_interfaces_agree_on_shape(reward, edits):
    sources = to_tensor(harness.render_sources(edits, CFG))
    targets = to_tensor(np.stack([world.render(e.target, CFG) for e in edits]))
    judged = reward(sources, [e.instruction for e in edits], targets)
    oracle = OracleReward(CFG)(sources, [e.instruction for e in edits], targets, edits=edits)
    for out in (judged, oracle):
        assert set(out) == {"followed", "preserved", "quality", "n_failures"}
        assert out["followed"].shape == (len(edits),)
    assert oracle["followed"].tolist() == [1.0] * len(edits)  # targets are correct edits
    assert ((judged["quality"] >= 0) & (judged["quality"] <= 1)).all()


def test_oracle_scores_and_caption_match(edits):
    sources = harness.render_sources(edits, CFG)
    targets = np.stack([world.render(e.target, CFG) for e in edits])
    scores = harness.oracle_scores(sources, edits, targets, CFG)
    assert scores["success"].tolist() == [1.0] * len(edits)
    unchanged = harness.oracle_scores(sources, edits, sources, CFG)
    assert unchanged["followed"].tolist() == [0.0, 0.0, 0.0, 1.0]  # only "do nothing" is followed

    class RenderingTeacher:  # a perfect teacher draws the scene itself
        def __init__(self, scenes):
            self.scenes = scenes

        def generate(self, captions, resolution, steps, seed, guidance):
            return np.stack([world.render(self.scenes[[world.caption(s) for s in self.scenes].index(c)], CFG)
                             for c in captions])

    scenes = [e.source for e in edits]
    rate, images = harness.caption_match(RenderingTeacher(scenes), scenes, CFG)
    assert rate == 1.0 and images.shape == (len(scenes), 32, 32, 3)
