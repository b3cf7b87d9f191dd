"""Multi-Reward as Condition: the reward condition, failure texts and the training stage."""

import math
import re

import numpy as np
import pytest
import torch

from nb_edit import world
from nb_edit.core.images import to_tensor, to_uint8
from nb_edit.core.validation import BadInputError
from nb_edit.methods.multireward.condition import (
    BEST_TEXT,
    UNKNOWN_TEXT,
    RewardCondition,
    RewardConditionedEditor,
    RewardEditPipeline,
    RewardInputs,
    sinusoidal_embedding,
)
from nb_edit.models.autoencoders import PixelAutoencoder
from nb_edit.models.editors import build_editor
from nb_edit.models.tiny_configs import TINY_TEXT_DIM, tiny_flux_config, tiny_unet_config
from nb_edit.rewards.single_turn import JudgeReward, multi_perspective, not_followed_text

WORLD = world.WorldConfig()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads
    waiting for each other cost more than the work; the session's setting comes back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_t, source = torch.randn(batch, 3, 32, 32, generator=gen), torch.randn(batch, 3, 32, 32, generator=gen)
    text = torch.randn(batch, 24, TINY_TEXT_DIM, generator=gen)
    pooled = torch.randn(batch, TINY_TEXT_DIM, generator=gen)
    return x_t, torch.tensor([0.3, 0.8][:batch]), text, pooled, source


def _reward(scores, seed=1):
    scores = torch.tensor(scores, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return RewardInputs(scores, torch.randn(scores.shape[0], TINY_TEXT_DIM, generator=gen))


def _wrapped(backbone):
    torch.manual_seed(0)
    config = tiny_unet_config() if backbone == "unet" else tiny_flux_config()
    editor = build_editor(backbone, config).eval()  # a randomly initialised "pretrained" editor
    return editor, RewardConditionedEditor(editor, RewardCondition.for_editor(editor, TINY_TEXT_DIM))


def test_sinusoidal_embedding_shapes_and_values():
    scores = torch.tensor([[5.0, 5.0, 5.0], [0.0, 2.5, 4.0]])
    emb = sinusoidal_embedding(scores, 16)
    assert emb.shape == (2, 3, 16)
    assert torch.allclose(emb[0, 0], emb[0, 1])  # same score, same code
    assert not torch.allclose(emb[1, 0], emb[1, 1])
    assert emb.abs().max() <= 1.0
    with pytest.raises(ValueError, match="even dim"):
        sinusoidal_embedding(scores, 15)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_zero_initialised_condition_leaves_editor_unchanged(backbone):
    editor, model = _wrapped(backbone)
    x_t, t, text, pooled, source = _inputs()
    reward = _reward([[5.0, 5.0, 5.0], [1.0, float("nan"), 2.0]])  # one known, one "unknown" row
    with torch.no_grad():
        plain = editor(x_t, t, text, pooled, source)
        conditioned = model(x_t, t, text, pooled, source, reward=reward)
    torch.testing.assert_close(conditioned, plain, atol=1e-6, rtol=0)
    # no hook is left behind on the editor after the call
    assert not editor.input_embedding_module()._forward_hooks


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_condition_changes_output_once_zero_weights_move(backbone):
    editor, model = _wrapped(backbone)
    x_t, t, text, pooled, source = _inputs()
    condition = model.condition
    with torch.no_grad():
        for layer in (condition.to_time, condition.attention.to_out[0]):
            layer.weight.normal_(0, 0.2)
        plain = editor(x_t, t, text, pooled, source)
        best = model(x_t, t, text, pooled, source, reward=_reward([[5.0, 5.0, 5.0]] * 2))
        low = model(x_t, t, text, pooled, source, reward=_reward([[1.0, 1.0, 1.0]] * 2))
        # each path alone carries the condition: the cross-attention only ...
        condition.to_time.weight.zero_()
        attention_only = model(x_t, t, text, pooled, source, reward=_reward([[1.0, 1.0, 1.0]] * 2))
    assert (best - plain).abs().max() > 1e-3
    assert (best - low).abs().max() > 1e-3  # the scores themselves reach the output
    assert (attention_only - plain).abs().max() > 1e-4


def test_condition_gets_gradients_at_zero_init():
    _, model = _wrapped("unet")
    x_t, t, text, pooled, source = _inputs()
    model(x_t, t, text, pooled, source, reward=_reward([[4.0, 3.0, 5.0]] * 2)).square().mean().backward()
    condition = model.condition
    assert condition.to_time.weight.grad.abs().sum() > 0  # zero weights still learn
    assert condition.attention.to_out[0].weight.grad.abs().sum() > 0


def test_eq3_after_each_unet_block_starts_silent_reaches_the_output_and_round_trips(tmp_path):
    """``injection="blocks"``: eq. 3 as written, one zero-initialised Linear_2 per UNet block."""
    from nb_edit.methods.export import attach_reward_condition, save_reward_condition

    editor = build_editor("unet", tiny_unet_config())
    condition = RewardCondition.for_editor(editor, TINY_TEXT_DIM, injection="blocks")
    model = RewardConditionedEditor(editor, condition)
    widths = [dim for _, dim in editor.block_modules()]
    assert [layer.out_features for layer in condition.to_blocks] == widths and len(widths) == 7  # 3 down, mid, 3 up
    x_t, t, text, pooled, source = _inputs()
    reward = _reward([[5.0, 5.0, 5.0]] * 2)
    with torch.no_grad():
        plain = editor(x_t, t, text, pooled, source)
        assert torch.allclose(model(x_t, t, text, pooled, source, reward=reward), plain)  # silent at init
    model(x_t, t, text, pooled, source, reward=reward).square().mean().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in condition.to_blocks)  # every block's linear learns
    assert condition.to_time.weight.grad is None  # the time embedding is not used in this mode
    with torch.no_grad():
        condition.attention.to_out[0].weight.zero_()  # the blocks' path alone carries the condition
        for layer in condition.to_blocks:
            layer.weight.normal_(0, 0.5)
        blocks_only = model(x_t, t, text, pooled, source, reward=reward)
    assert (blocks_only - plain).abs().max() > 1e-3
    save_reward_condition(condition, tmp_path)
    again = attach_reward_condition(build_editor("unet", tiny_unet_config()), tmp_path)
    assert [layer.out_features for layer in again.condition.to_blocks] == widths
    with pytest.raises(ValueError, match="eq. 3"):
        RewardCondition.for_editor(build_editor("dit", tiny_flux_config()), TINY_TEXT_DIM, injection="blocks")


def test_table4_conditions_read_one_part_each_and_round_trip(tmp_path):
    """``parts``: the scores alone or the failure texts alone reach the editor (Table 4's ablation)."""
    from nb_edit.methods.export import attach_reward_condition, save_reward_condition

    x_t, t, text, pooled, source = _inputs()
    outputs = {}
    for parts in (("scores",), ("text",), ("scores", "text")):
        torch.manual_seed(0)
        editor = build_editor("unet", tiny_unet_config()).eval()
        condition = RewardCondition.for_editor(editor, TINY_TEXT_DIM, parts=parts)
        model = RewardConditionedEditor(editor, condition)
        with torch.no_grad():
            for layer in (condition.to_time, condition.attention.to_out[0]):
                layer.weight.normal_(0, 0.2)
            runs = {(scores, seed): model(x_t, t, text, pooled, source, reward=_reward([[scores] * 3] * 2, seed=seed))
                    for scores in (5.0, 1.0) for seed in (1, 2)}  # seed: another failure text (pooled vector)
        score_moves = (runs[5.0, 1] - runs[1.0, 1]).abs().max() > 1e-4
        text_moves = (runs[5.0, 1] - runs[5.0, 2]).abs().max() > 1e-4
        assert (score_moves, text_moves) == ("scores" in parts, "text" in parts)
        outputs[parts] = runs[5.0, 1]
        save_reward_condition(condition, tmp_path / "_".join(parts))
        again = attach_reward_condition(editor, tmp_path / "_".join(parts)).eval()
        assert again.condition.parts == parts
        with torch.no_grad():
            assert torch.allclose(again(x_t, t, text, pooled, source, reward=_reward([[5.0] * 3] * 2)), runs[5.0, 1])
    with pytest.raises(ValueError, match="parts="):
        RewardCondition.for_editor(build_editor("unet", tiny_unet_config()), TINY_TEXT_DIM, parts=("score",))


class _TextEncoderStub(torch.nn.Module):
    """Deterministic pooled vectors per text: enough for the pipeline's plumbing."""

    def encode(self, texts):
        pooled = torch.stack([torch.randn(TINY_TEXT_DIM, generator=torch.Generator().manual_seed(hash(t) % 2**31))
                              for t in texts])
        return pooled[:, None].expand(-1, 24, -1).contiguous(), pooled, torch.ones(len(texts), 24)


def test_pipeline_keeps_reward_in_every_cfg_branch_and_checks_scores():
    _, model = _wrapped("dit")
    pipe = RewardEditPipeline(model, _TextEncoderStub(), PixelAutoencoder())
    cond = pipe.condition(["make the red circle blue"] * 2, torch.zeros(2, 3, 32, 32))
    assert torch.equal(cond.reward.scores, torch.full((2, 3), 5.0))
    assert torch.equal(cond.reward.text_pooled, pipe.text_encoder.encode([BEST_TEXT] * 2)[1])
    assert pipe.null_condition(cond).reward is cond.reward  # "None; None; None" in the null branch too
    out = pipe.edit(np.zeros((2, 32, 32, 3), np.uint8), ["make the red circle blue"] * 2, steps=2, guidance=2.0,
                    scores=[[5, 5, 5], [1, 1, 1]], failure_texts=[BEST_TEXT, "x; y; z"])
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        pipe.condition(["do nothing"], scores=(6, 5, 5))
    with pytest.raises(ValueError, match="3 numbers"):
        pipe.condition(["do nothing"], scores=(5, 5))


def test_reward_guidance_is_cfg_over_the_reward_and_off_by_default():
    """``reward_guidance = w``: ``v_text(c_R) + (w - 1) (v(c_R) - v(c_unknown))``; ``w = 1`` is the
    paper's sampler, bit for bit; ``w = 0`` samples with the reward unknown."""
    from nb_edit.flow.pipeline import EditPipeline
    editor, model = _wrapped("unet")
    with torch.no_grad():  # a condition the editor reads
        for layer in (model.condition.to_time, model.condition.attention.to_out[0]):
            layer.weight.normal_(0, 0.2)
    pipe = RewardEditPipeline(model, _TextEncoderStub(), PixelAutoencoder())
    texts, sources = ["make the red circle blue"] * 2, np.zeros((2, 32, 32, 3), np.uint8)
    cond = pipe.condition(texts, torch.zeros(2, 3, 32, 32), scores=(1, 2, 3), failure_texts="x; y; z")
    unknown = pipe.unknown_reward(cond)
    assert torch.isnan(unknown.reward.scores).all() and unknown.text_states is cond.text_states
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0.7, 0.7])
    with torch.no_grad():
        v_c, v_u = pipe.velocity_fn(cond)(x, t), pipe.velocity_fn(unknown)(x, t)
        v_text = pipe.guided_velocity_fn(cond, 2.0)(x, t)
        assert (v_c - v_u).abs().max() > 1e-3
        torch.testing.assert_close(pipe.guided_velocity_fn(cond, 1.0, reward_guidance=3.0)(x, t),
                                   v_u + 3.0 * (v_c - v_u))
        torch.testing.assert_close(pipe.guided_velocity_fn(cond, 2.0, reward_guidance=3.0)(x, t),
                                   v_text + 2.0 * (v_c - v_u))
    plain = pipe.edit(sources, texts, steps=2, seed=1, scores=(1, 2, 3), failure_texts="x; y; z")
    assert np.array_equal(plain, pipe.edit(sources, texts, steps=2, seed=1, scores=(1, 2, 3),
                                           failure_texts="x; y; z", reward_guidance=1.0))
    assert np.array_equal(pipe.edit(sources, texts, steps=2, seed=1, reward_guidance=0.0),
                          pipe.edit(sources, texts, steps=2, seed=1, scores=np.full((2, 3), np.nan),
                                    failure_texts=UNKNOWN_TEXT))
    assert not np.array_equal(plain, pipe.edit(sources, texts, steps=2, seed=1, scores=(1, 2, 3),
                                               failure_texts="x; y; z", reward_guidance=4.0))
    with pytest.raises(ValueError, match="reward_guidance"):
        pipe.edit(sources, texts, steps=2, reward_guidance=float("nan"))
    # the no-reward baseline (a bare editor) accepts and ignores it, as it does the scores
    bare = RewardEditPipeline(editor, _TextEncoderStub(), PixelAutoencoder())
    assert np.array_equal(bare.edit(sources, texts, steps=2, seed=1, reward_guidance=4.0),
                          EditPipeline.edit(bare, sources, texts, steps=2, seed=1))


# ------------------------------------------------------------------------- failure texts


class OracleAnsweringJudge:
    """A fake judge with known answers: presence questions are answered from the oracle's parse
    of image 2; every other yes/no question gets ``other_answer``; scores are fixed."""

    def __init__(self, other_answer=True, score=4.0):
        self.other_answer, self.score, self.asked = other_answer, score, []

    def yes_no_logits(self, images, questions):
        self.asked.extend(questions)
        answers = []
        for image, question in zip(to_uint8(images[1]), questions):
            match = re.match(r"does image 2 contain a (\w+ \w+) \?", question)
            if match:
                answers.append(match.group(1) in {o.name for o in world.parse(image, WORLD).scene.objects})
            else:
                answers.append(self.other_answer)
        yes = torch.tensor([2.0 if a else -2.0 for a in answers])
        return yes, -yes

    def expected_score(self, images, questions, values):
        return torch.full((len(questions),), self.score)


def _edit(edit_type, min_objects=1, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(500):
        scene = world.sample_scene(rng, WORLD)
        if len(scene.objects) < min_objects:
            continue
        try:
            return world.sample_edit(scene, rng, WORLD, edit_type)
        except ValueError:
            continue
    raise AssertionError(f"no {edit_type} edit found")


def _annotate(edit, outputs, judge):
    n = len(outputs)
    source = world.render(edit.source, WORLD)
    return multi_perspective(JudgeReward(judge), to_tensor(np.stack([source] * n)), [edit.instruction] * n,
                             to_tensor(np.stack(outputs)), [edit.edit_type] * n, captions=[edit.caption] * n,
                             captions_edited=[edit.caption_edited] * n)


def test_failure_texts_name_object_and_attribute():
    edit = _edit("colour", min_objects=2)
    ref = edit.source.objects[edit.obj_index]
    new_colour = edit.target.objects[edit.obj_index].colour
    other_index = next(i for i in range(len(edit.source.objects)) if i != edit.obj_index)
    other = edit.source.objects[other_index]
    recoloured = next(c for c in WORLD.colours if not edit.target.matching(c, other.shape))
    objects = list(edit.target.objects)
    objects[other_index] = other.with_(colour=recoloured)
    collateral = world.render(edit.target.with_(objects=objects), WORLD)  # right edit + another object changed
    outputs = [world.render(edit.target, WORLD), world.render(edit.source, WORLD), collateral]
    out = _annotate(edit, outputs, OracleAnsweringJudge())

    assert out["following_text"][0] == "None" and out["preserving_text"][0] == "None"  # the oracle-true image
    assert out["following_text"][1] == f"the {ref.name} is not {new_colour}"  # unchanged source: edit missing
    assert out["preserving_text"][1] == "None"
    assert out["following_text"][2] == "None"
    assert out["preserving_text"][2] == f"the {other.name} changed"  # names the object that changed
    assert torch.equal(out["following"], torch.full((3,), 4.0)) and int(out["n_failures"]) == 0
    assert out["quality_text"] == ["None"] * 3


@pytest.mark.parametrize("world_name", ["small", "rich"])
def test_no_condition_text_holds_an_unknown_token_or_is_cut(world_name):
    """Every failure text the editor can read as its condition reaches it word for word: "None",
    "not" and "unknown" included (without them "is blue" and "is not blue" read alike)."""
    from nb_edit.methods.multireward.condition import BEST_TEXT, UNKNOWN_TEXT, join_failure_texts
    from nb_edit.rewards.single_turn import FOLLOWING_FALLBACK, PRESERVING_FALLBACK, QUALITY_FAILURE
    from nb_edit.standins.editors import world_tokenizer

    cfg = world.preset(world_name)
    tokenizer = world_tokenizer(cfg)
    rng = np.random.default_rng(0)
    texts = [BEST_TEXT, UNKNOWN_TEXT, join_failure_texts(FOLLOWING_FALLBACK, PRESERVING_FALLBACK, QUALITY_FAILURE)]
    for _ in range(400):
        edit = world.sample_edit(world.sample_scene(rng, cfg), rng, cfg)
        names = sorted({o.name for o in edit.source.objects})
        preserving = f"the {' and the '.join(names)} changed"  # the judge's text: what changed, by name
        texts.append(join_failure_texts(not_followed_text(edit.instruction, edit.edit_type), preserving,
                                        QUALITY_FAILURE))
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, (text, tokenizer.convert_ids_to_tokens(ids))
        assert len(ids) <= tokenizer.model_max_length, (text, len(ids))


def test_failure_texts_for_remove_and_questions_the_judge_cannot_see():
    edit = _edit("remove")
    gone = edit.source.objects[edit.obj_index].name
    out = _annotate(edit, [world.render(edit.source, WORLD)], OracleAnsweringJudge(score=1.0))
    assert out["following_text"] == [f"the {gone} is still there"]
    assert out["quality_text"] == ["the picture is noisy or blurred"]  # quality score 1 < threshold

    move = _edit("move")
    judge = OracleAnsweringJudge(other_answer=False)  # "did image 2 carry out ...?" -> no
    out = _annotate(move, [world.render(move.source, WORLD)], judge)
    ref = move.source.objects[move.obj_index].name
    assert out["following_text"][0].startswith(f"the {ref} did not move")
    assert out["preserving_text"] == ["the rest of the image changed"]  # nothing named is missing
    assert any(q.startswith("image 1 is the source") and "carry out" in q for q in judge.asked)


def test_failure_text_hook_replaces_the_world_recipe():
    edit = _edit("colour")
    calls = {}

    def vlm_writes(**kwargs):
        calls.update(kwargs)
        return [{"following": "the sky is green", "preserving": "the dog moved"}]

    source = to_tensor(world.render(edit.source, WORLD))
    out = multi_perspective(JudgeReward(OracleAnsweringJudge()), source, [edit.instruction], source,
                            failure_text_fn=vlm_writes)
    assert out["following_text"] == ["the sky is green"] and out["quality_text"] == ["None"]
    assert set(calls) >= {"sources", "instructions", "outputs", "scores"}
    assert not_followed_text("paint the background navy", "background") == "the background is not navy"


# ------------------------------------------------------------------------- training stage


@pytest.fixture(scope="module")
def stage(tmp_path_factory, smoke_standins):
    import os

    from nb_edit.core.config import RunSettings
    from nb_edit.data.world_datasets import shapesworld
    from nb_edit.models.vlm.judge import VLMJudge
    from nb_edit.rewards.single_turn import annotate_rewards
    from nb_edit.standins.judge import judge_tokenizer

    root = smoke_standins
    os.environ["NB_EDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        data = shapesworld(RunSettings.for_profile("smoke"))
    finally:
        del os.environ["NB_EDIT_CACHE"]
    # a randomly initialised tiny judge: its answers are arbitrary, the plumbing is what is tested
    judge = VLMJudge.tiny("llava", judge_tokenizer(WORLD), image_size=32, vision_layers=1, text_layers=1).freeze()
    noisy = data["noisy"].split("train")[:8]
    annotated = annotate_rewards(noisy, JudgeReward(judge), tmp_path_factory.mktemp("rewardedit"))
    return {"root": root, "data": data, "noisy": noisy, "annotated": annotated}


def test_annotate_rewards_writes_rewardedit_records(stage):
    noisy, annotated = stage["noisy"], stage["annotated"]
    assert len(annotated) == len(noisy) and annotated.n_paired == len(noisy)
    for record in annotated:
        rewards = record.rewards
        assert set(rewards) == {"following", "preserving", "quality",
                                "following_text", "preserving_text", "quality_text"}
        assert all(0.0 <= rewards[p] <= 5.0 for p in ("following", "preserving", "quality"))
        assert all(isinstance(rewards[f"{p}_text"], str) and rewards[f"{p}_text"]
                   for p in ("following", "preserving", "quality"))
    np.testing.assert_array_equal(annotated.load(0)["target"], noisy.load(0)["target"])


@pytest.mark.parametrize("variant", ["reward", "noreward", "text_only"])
def test_multireward_trains_each_variant(stage, tmp_path, variant):
    from nb_edit.methods.multireward.train import MultiRewardConfig, compare_conditions, train_multireward

    cfg = MultiRewardConfig.for_profile("smoke", variant=variant, editor_id=str(stage["root"] / "noisy"))
    pipe, history = train_multireward(cfg, stage["annotated"], tmp_path / "ckpt", progress=False)
    assert len(history) == cfg.steps and all(h["skipped"] == 0 and math.isfinite(h["loss"]) for h in history)
    assert pipe.uses_reward == (variant != "noreward")
    trainable = {n for n, p in pipe.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any(n.startswith("condition.") for n in trainable) == (variant != "noreward")
    if variant == "text_only":
        assert pipe.model.condition.parts == ("text",)
    assert not any("lora_" not in n and not n.startswith("condition.") for n in trainable)  # base frozen
    # edits under the best condition and the low-score control, rated by the oracle
    rates = compare_conditions(pipe, stage["data"]["test"], cfg.replace(sampling_steps=2), n=2)
    assert set(rates) == {"best", "low"} and all(0.0 <= v <= 1.0 for r in rates.values() for v in r.values())


def test_full_fine_tuning_trains_every_editor_weight_and_resumes(stage, tmp_path):
    from nb_edit.methods.multireward.train import MultiRewardConfig, train_multireward

    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(stage["root"] / "noisy"), lora_rank=0)
    pipe, history = train_multireward(cfg, stage["annotated"], tmp_path / "ckpt", progress=False)
    editor = pipe.model.editor
    assert all(p.requires_grad for p in editor.parameters())
    assert not any("lora_" in n for n, _ in editor.named_parameters())
    weights = {n: p.detach().clone() for n, p in editor.named_parameters()}
    again, _ = train_multireward(cfg, stage["annotated"], tmp_path / "ckpt", progress=False)  # finished: restored
    assert all(torch.equal(weights[n], p) for n, p in again.model.editor.named_parameters())
    fresh, _ = train_multireward(cfg.replace(steps=0), stage["annotated"], tmp_path / "untrained", progress=False)
    assert any(not torch.equal(weights[n], p) for n, p in fresh.model.editor.named_parameters())  # it trained
    with pytest.raises(ValueError, match="lora_rank"):
        cfg.replace(lora_rank=-1)


def test_condition_module_trains_at_its_own_lr_without_weight_decay(stage):
    from nb_edit.methods.multireward.train import MultiRewardConfig, MultiRewardTrainer

    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(stage["root"] / "noisy"), lr=1e-3,
                                        condition_lr_scale=20.0)
    trainer = MultiRewardTrainer(cfg, stage["annotated"])
    lora_group, cond_group = trainer.param_groups()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert lora_group["params"] and all("lora_" in names[id(p)] for p in lora_group["params"])
    assert cond_group["params"] and all(names[id(p)].startswith("condition.") for p in cond_group["params"])
    assert cond_group["lr"] == pytest.approx(2e-2) and cond_group["weight_decay"] == 0.0
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for g in (lora_group, cond_group) for p in g["params"]} == trainable  # every one, once
    baseline = MultiRewardTrainer(cfg.replace(variant="noreward"), stage["annotated"])
    assert len(baseline.param_groups()) == 1
    with pytest.raises(ValueError, match="condition_lr_scale"):
        cfg.replace(condition_lr_scale=0.0)


def test_condition_use_is_zero_at_init_and_moves_with_the_condition(stage):
    from nb_edit.methods.multireward.train import MultiRewardConfig, MultiRewardTrainer, condition_use

    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(stage["root"] / "noisy"))
    trainer = MultiRewardTrainer(cfg, stage["annotated"])
    at_init = condition_use(trainer.pipe, stage["annotated"], max_score=5.1, repeats=2)
    assert at_init["n"] == len(stage["annotated"])  # every score is below 5.1
    assert math.isfinite(at_init["loss_own"]) and at_init["gap"] == 0.0  # zero-initialised: no effect
    condition = trainer.model.condition
    with torch.no_grad():
        for layer in (condition.to_time, condition.attention.to_out[0]):
            layer.weight.normal_(0, 0.2)
    moved = condition_use(trainer.pipe, stage["annotated"], max_score=5.1, repeats=2)
    assert moved["loss_own"] != moved["loss_best"] and moved["gap"] == moved["loss_best"] - moved["loss_own"]
    assert condition_use(trainer.pipe, stage["annotated"], max_score=-1.0)["n"] == 0.0
    plain = MultiRewardTrainer(cfg.replace(variant="noreward"), stage["annotated"])
    assert math.isnan(condition_use(plain.pipe, stage["annotated"], max_score=5.1)["gap"])


@pytest.mark.bad_input
def test_multireward_refuses_bad_config_and_unannotated_data(stage, tmp_path):
    from nb_edit.methods.multireward.train import MultiRewardConfig, train_multireward

    with pytest.raises(ValueError, match="variant='rewards'.*noreward, reward, score_only, text_only"):
        MultiRewardConfig.for_profile("smoke", variant="rewards")
    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(stage["root"] / "noisy"))
    with pytest.raises(ValueError, match="annotate_rewards"):
        train_multireward(cfg, stage["noisy"], tmp_path / "ckpt", progress=False)
    with pytest.raises(ValueError, match="no target"):
        train_multireward(cfg, stage["data"]["unpaired"], tmp_path / "ckpt", progress=False)


def test_record_condition_and_low_score_control():
    from nb_edit.methods.multireward.train import low_condition, record_condition

    scores, text = record_condition({"following": 2.0, "following_text": "the red circle is not blue", "quality": 4})
    assert scores[0] == 2.0 and math.isnan(scores[1]) and scores[2] == 4.0  # a missing score is unknown
    assert text == "the red circle is not blue; None; None"
    # numpy scalars (the oracle's graded scores) are numbers; text and booleans are not scores
    scores, _ = record_condition({"following": np.float32(1.25), "preserving": "high", "quality": True})
    assert scores[0] == 1.25 and math.isnan(scores[1]) and math.isnan(scores[2])
    rows, texts = low_condition(["make the red circle blue"], ["colour"], scores=(1, 1, 1))
    assert rows.tolist() == [[1.0, 1.0, 1.0]]
    assert texts[0].startswith("the red circle is not blue; ") and "None" not in texts[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["nan", "0_255"])
def test_the_reward_pipeline_refuses_bad_source_tensors(kind):
    """The reward-conditioned edit checks a tensor source as the plain pipeline does."""
    _, model = _wrapped("dit")
    pipe = RewardEditPipeline(model, _TextEncoderStub(), PixelAutoencoder())
    sources = torch.zeros(2, 3, 32, 32)
    if kind == "nan":
        sources[0, 0, 0, 0] = float("nan")
    else:
        sources = sources + 128.0
    with pytest.raises(BadInputError, match=r"sources.*Fix:.*to_tensor"):
        pipe.edit(sources, ["make the red circle blue"] * 2, steps=1)
