"""MT-EditFlow: multi-turn rollouts, per-turn rewards, broadcast vs per-turn advantages, GRPO and
NFT training at smoke sizes, and the multi-turn evaluation."""


import numpy as np
import pytest
import torch

from nb_edit import world
from nb_edit.core.images import to_tensor
from nb_edit.flow.pipeline import Conditioning
from nb_edit.flow.sampling import flow_sigmas
from nb_edit.methods.mtrl.policy import normalise_rewards_01
from nb_edit.methods.mtrl.train import (
    MTRLConfig,
    compute_advantages,
    evaluate_multiturn,
    rollout,
    sequences_from,
    train_mtrl,
)
from nb_edit.models.lora import lora_state_dict
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.rewards.multiturn import MultiTurnJudgeReward, MultiTurnOracleReward, cumulative_instructions
from nb_edit.standins.judge import judge_tokenizer

CFG = world.WorldConfig()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared machine: one thread avoids oversubscribing its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(smoke_data):
    return smoke_data


@pytest.fixture(scope="module")
def clean_editor(smoke_standins):
    """The smoke stand-in of the clean-pair editor (made from the smoke teacher)."""
    return smoke_standins / "clean"


@pytest.fixture(scope="module")
def tiny_judge():
    return VLMJudge.tiny("llava", judge_tokenizer(CFG), seed=0).freeze()


# ------------------------------------------------------------------------------ rollouts
class _Identity:
    def encode(self, x):
        return x

    def decode(self, x):
        return x


class FakePipe:
    """An "editor" that moves every image halfway to grey plus a shift; records what each turn sees."""

    def __init__(self):
        self.autoencoder, self.seen = _Identity(), []

    def condition(self, texts, sources):
        self.seen.append((list(texts), sources.clone()))
        return Conditioning(torch.zeros(len(texts), 1, 1), torch.zeros(len(texts), 1), sources)

    def velocity_fn(self, cond):
        target = 0.5 * cond.source_latents + 0.2  # the edit: a function of the turn's own input

        def fn(x, t):
            return (x - target) / t.clamp_min(1e-3)[:, None, None, None]  # x0 = x - t v = target

        return fn

    def sigmas(self, steps):
        return flow_sigmas(steps)


def test_rollout_shapes_and_each_turn_edits_the_previous_output():
    pipe, gen = FakePipe(), torch.Generator().manual_seed(0)
    sources = torch.rand(2, 3, 8, 8) * 2 - 1
    instructions = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    ro = rollout(pipe, sources, instructions, group_size=3, steps=3, noise_level=0.5, train_steps=2, generator=gen)
    assert ro.shape == (6, 3)  # groups x G trajectories, turns
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert [traj.log_probs.shape for traj in ro.trajectories] == [(6, 2)] * 3
    assert torch.isfinite(torch.stack([traj.log_probs for traj in ro.trajectories])).all()
    assert torch.equal(ro.turn_sources[0], sources.repeat_interleave(3, dim=0))
    for turn in range(3):
        texts, seen = pipe.seen[turn]
        assert texts == [instructions[g][turn] for g in ro.group_ids.tolist()]
        if turn:  # turn t's input is exactly turn t-1's output, not a ground-truth image
            assert torch.equal(seen, ro.outputs[turn - 1]) and torch.equal(ro.turn_sources[turn], ro.outputs[turn - 1])
        edit_error = (ro.outputs[turn] - (0.5 * seen + 0.2)).abs().mean()
        assert edit_error < (ro.outputs[turn] - seen).abs().mean()  # the fake edit was applied (up to SDE noise)
        assert torch.equal(ro.outputs[turn], torch.round((ro.outputs[turn] + 1) * 127.5) / 127.5 - 1)  # uint8 grid
    assert not torch.equal(ro.outputs[0][0], ro.outputs[0][1])  # the SDE noise makes a group diverse


# ------------------------------------------------------------------------------ advantages
def _hand_made():
    # group 0: turn scores (5, 1) and (1, 5): equal on average, opposite per turn
    # group 1: (4, 4) and (2, 2): the first trajectory is better at every turn
    scores = torch.tensor([[5.0, 1.0], [1.0, 5.0], [4.0, 4.0], [2.0, 2.0]])
    return scores, scores.clone(), torch.tensor([0, 0, 1, 1])


def test_broadcast_gives_one_advantage_per_trajectory_and_skips_flat_groups():
    if_s, cc_s, groups = _hand_made()
    adv = compute_advantages(if_s, cc_s, groups, n_steps=3, aggregation="mean", fusion="reward")
    assert adv.per_step.shape == (4, 2, 3) and adv.keep.shape == (4, 2)
    assert adv.keep.tolist() == [[False, False], [False, False], [True, True], [True, True]]
    assert (adv.n_groups, adv.n_zero_var) == (2, 1)  # group 0 averages out: skipped and counted
    assert torch.allclose(adv.per_step[2], torch.ones(2, 3), atol=1e-4)  # +1 at every turn and step
    assert torch.allclose(adv.per_step[3], -torch.ones(2, 3), atol=1e-4)
    assert torch.all(adv.per_step[:2] == 0)


def test_per_turn_advantages_differ_across_turns():
    if_s, cc_s, groups = _hand_made()
    adv = compute_advantages(if_s, cc_s, groups, n_steps=3, fusion="reward", advantage="perturn")
    assert adv.per_step.shape == (4, 2, 3) and bool(adv.keep.all())
    assert (adv.n_groups, adv.n_zero_var) == (4, 0)  # group-turn pairs
    expected = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert torch.allclose(adv.per_step[..., 0], expected, atol=1e-4)
    assert torch.equal(adv.per_step[..., 0], adv.per_step[..., 2])  # still the same at every step


@pytest.mark.parametrize("aggregation, group0_flat, row0_sign", [("mean", True, 0), ("min", True, 0),
                                                                  ("product", True, 0), ("last", False, -1)])
def test_aggregation_decides_which_trajectory_wins(aggregation, group0_flat, row0_sign):
    if_s, cc_s, groups = _hand_made()
    adv = compute_advantages(if_s, cc_s, groups, n_steps=1, aggregation=aggregation, fusion="advantage")
    assert bool(adv.keep[0, 0]) is not group0_flat
    assert torch.sign(adv.per_step[0, 0, 0]).item() == row0_sign


def test_failed_scores_are_imputed_within_their_group():
    if_s, cc_s, groups = _hand_made()
    if_s[3, 1] = float("nan")  # a judge failure: takes group 1's valid mean at turn 2, (4 + nothing) -> 4
    adv = compute_advantages(if_s, cc_s, groups, n_steps=1, advantage="perturn")
    assert adv.n_imputed == 1 and torch.isfinite(adv.per_step).all()
    assert adv.per_step[2, 1, 0] > 0 and adv.per_step[3, 1, 0] < 0  # CC still separates them


# ------------------------------------------------------------------------------ rewards
def _sequence_tensors(data, n=2):
    seqs = sequences_from(data["multiturn"].split("train"), n_turns=3)[:n]
    original = to_tensor(np.stack([s.source for s in seqs]))
    targets = [to_tensor(np.stack([s.targets[t] for s in seqs])) for t in range(3)]
    turn_sources = [original] + targets[:-1]
    instructions = [[s.instructions[t] for s in seqs] for t in range(3)]
    edits = [[s.edits[t] for s in seqs] for t in range(3)]
    return original, turn_sources, instructions, targets, edits


def test_judge_rewards_modes_and_scorings(data, tiny_judge):
    original, turn_sources, instructions, outputs, _ = _sequence_tensors(data)
    turns = (original, turn_sources, instructions, outputs)
    multi = MultiTurnJudgeReward(tiny_judge, "expected", "multi").score_turns(*turns)
    single = MultiTurnJudgeReward(tiny_judge, "expected", "single").score_turns(*turns)
    assert multi["if"].shape == multi["cc"].shape == (2, 3) and int(multi["n_failures"]) == 0
    assert bool(((multi["if"] >= 1) & (multi["if"] <= 5)).all())
    assert torch.allclose(multi["if"], single["if"])  # IF is judged against the turn's own source either way
    assert torch.allclose(multi["cc"][:, 0], single["cc"][:, 0], atol=1e-5)  # turn 1: the original is its source
    assert not torch.allclose(multi["cc"][:, 1:], single["cc"][:, 1:])  # later turns: against the original
    one_turn = MultiTurnJudgeReward(tiny_judge, "expected")(turn_sources[1], instructions[1], outputs[1])
    assert torch.allclose(one_turn["if"], single["if"][:, 1], atol=1e-5)

    sampled = [MultiTurnJudgeReward(tiny_judge, "sampled", generator=torch.Generator().manual_seed(s))
               .score_turns(original, turn_sources, instructions, outputs)["if"] for s in (1, 1)]
    assert torch.equal(sampled[0], sampled[1])  # the generator makes sampling reproducible
    assert set(sampled[0].flatten().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_judge_failures_are_nan_and_counted(data, tiny_judge, monkeypatch):
    original, turn_sources, instructions, outputs, _ = _sequence_tensors(data)
    generated = MultiTurnJudgeReward(tiny_judge, "generate").score_turns(original, turn_sources, instructions, outputs)
    n_nan = int((~torch.isfinite(generated["if"])).sum() + (~torch.isfinite(generated["cc"])).sum())
    assert int(generated["n_failures"]) == n_nan  # an untrained judge writes no parseable score

    real = tiny_judge.answer_logits

    def broken(images, questions, **kwargs):
        logits = real(images, questions, **kwargs)
        logits[0] = float("nan")  # the first sample's answer is unreadable
        return logits

    monkeypatch.setattr(tiny_judge, "answer_logits", broken)
    out = MultiTurnJudgeReward(tiny_judge, "expected")(turn_sources[0], instructions[0], outputs[0])
    assert torch.isnan(out["if"][0]) and torch.isnan(out["cc"][0]) and torch.isfinite(out["if"][1])
    assert int(out["n_failures"]) == 2


def test_oracle_rewards_and_cumulative_consistency(data):
    original, turn_sources, instructions, targets, edits = _sequence_tensors(data)
    reward = MultiTurnOracleReward(CFG, "multi")
    perfect = reward.score_turns(original, turn_sources, instructions, targets, edits=edits)
    assert bool((perfect["if"] >= 4).all() and (perfect["cc"] >= 4).all())
    unchanged = reward.score_turns(original, turn_sources, instructions, turn_sources, edits=edits)
    assert bool((unchanged["if"] <= 2).all())  # doing nothing follows no instruction
    assert torch.equal(unchanged["cc"], torch.cummin(unchanged["cc"], dim=1).values)
    assert cumulative_instructions([["a", "b"], ["c", "d"]]) == [["a", "b"], ["a . c", "b . d"]]


def test_make_reward_reads_the_config(tiny_judge, tmp_path):
    from nb_edit.methods.mtrl.train import make_reward

    tiny_judge.save_pretrained(tmp_path / "judge")
    judged = make_reward(MTRLConfig.for_profile("smoke", judge_id=str(tmp_path / "judge"), reasoning="sampled",
                                                scoring="single"))
    assert isinstance(judged, MultiTurnJudgeReward) and (judged.mode, judged.scoring) == ("sampled", "single")
    assert isinstance(make_reward(MTRLConfig.for_profile("smoke", reward="oracle")), MultiTurnOracleReward)


# ------------------------------------------------------------------------------ training
def _changed(model, adapter):
    return any(bool(w.abs().sum() > 0) for n, w in lora_state_dict(model, adapter).items() if "lora_B" in n)


def test_grpo_smoke_training_updates_the_lora(data, clean_editor, tiny_judge, tmp_path):
    cfg = MTRLConfig.for_profile("smoke", algorithm="grpo", policy_id=str(clean_editor), updates_per_rollout=2)
    reward = MultiTurnJudgeReward(tiny_judge, "expected")
    pipe, history = train_mtrl(cfg, data["multiturn"], tmp_path / "ckpt", reward=reward, progress=False)
    assert len(history) == cfg.steps and all(h["skipped"] == 0 for h in history)
    assert all(np.isfinite(h["loss"]) for h in history)
    first = history[0]
    assert {"reward_if_turn3", "reward_cc_turn1", "zero_var_groups", "rollout_oracle_turn3_success", "kl"} <= set(first)
    assert first["groups"] == cfg.groups_per_step and "reward_if" not in history[1]  # one rollout, two updates
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the first update is on-policy
    assert _changed(pipe.model, "policy")  # LoRA B starts at zero
    out = pipe.edit(np.zeros((1, 32, 32, 3), np.uint8), ["make the background blue"], steps=2)
    assert out.shape == (1, 32, 32, 3)


def test_the_reasoning_study_trains_with_a_generated_judge_answer(data, clean_editor, tiny_judge, tmp_path):
    """The seed study's reasoning-mode run (registry.MTRL_VARIANTS "grpo_reasoning_generate"): the judge writes its score, unparseable answers count
    as failures, and training goes on (failed scores are imputed within their group)."""
    from nb_edit.methods import registry
    from nb_edit.methods.mtrl.train import make_reward

    tiny_judge.save_pretrained(tmp_path / "judge")
    cfg = registry.mtrl_configs("smoke", policy_id=str(clean_editor), judge_id=str(tmp_path / "judge"),
                                variants="grpo_reasoning_generate")["grpo_reasoning_generate"]
    reward = make_reward(cfg)
    assert reward.mode == "generate"
    pipe, history = train_mtrl(cfg, data["multiturn"], tmp_path / "ckpt", reward=reward, progress=False)
    assert len(history) == cfg.steps and all(np.isfinite(h["loss"]) for h in history)


def test_nft_smoke_training_moves_policy_and_old_policy(data, clean_editor, tmp_path, monkeypatch):
    import nb_edit.methods.mtrl.train as mtrl_train

    scales = []  # the reward -> r map gets the config's normaliser (DiffusionNFT's fixed one)

    def recording(advantages, scale=None):
        scales.append(scale)
        return normalise_rewards_01(advantages, scale)

    monkeypatch.setattr(mtrl_train, "normalise_rewards_01", recording)
    cfg = MTRLConfig.for_profile("smoke", algorithm="nft", reward="oracle", advantage="perturn",
                                 policy_id=str(clean_editor))
    pipe, history = train_mtrl(cfg, data["multiturn"], tmp_path / "ckpt", progress=False)
    assert scales and set(scales) == {cfg.nft_r_scale} == {5.0}
    assert len(history) == cfg.steps and all(np.isfinite(h["loss"]) and h["skipped"] == 0 for h in history)
    assert {"err_positive", "err_negative", "reward_if_turn1"} <= set(history[0])
    assert _changed(pipe.model, "policy") and _changed(pipe.model, "old")  # old follows the policy slowly
    new = lora_state_dict(pipe.model, "policy")
    old = {n.replace(".old.", ".policy."): w for n, w in lora_state_dict(pipe.model, "old").items()}
    assert any(not torch.equal(new[n], old[n]) for n in new)  # ... but lags behind it


def test_nft_resume_continues_bit_for_bit(data, clean_editor, tmp_path):
    base = dict(algorithm="nft", reward="oracle", track_oracle=False, policy_id=str(clean_editor))
    whole, _ = train_mtrl(MTRLConfig.for_profile("smoke", **base), data["multiturn"], tmp_path / "a", progress=False)
    train_mtrl(MTRLConfig.for_profile("smoke", **base, steps=1), data["multiturn"], tmp_path / "b", progress=False)
    resumed, _ = train_mtrl(MTRLConfig.for_profile("smoke", **base), data["multiturn"], tmp_path / "b", progress=False)
    for adapter in ("policy", "old"):  # the old policy is checkpointed with the model
        a, b = lora_state_dict(whole.model, adapter), lora_state_dict(resumed.model, adapter)
        assert all(torch.equal(a[n], b[n]) for n in a)


class _FlatReward:
    """Every trajectory scores the same: no group can teach anything."""

    def score_turns(self, original, turn_sources, instructions, outputs, **meta):
        n, t = outputs[0].shape[0], len(outputs)
        return {"if": torch.full((n, t), 3.0), "cc": torch.full((n, t), 4.0), "n_failures": torch.tensor(0)}


def test_single_turn_grpo_skips_and_counts_zero_variance_groups(data, clean_editor, tmp_path):
    cfg = MTRLConfig.for_profile("smoke", n_turns=1, policy_id=str(clean_editor), track_oracle=False)
    pipe, history = train_mtrl(cfg, data["paired"], tmp_path / "ckpt", reward=_FlatReward(), progress=False)
    assert [h["zero_var_groups"] for h in history] == [cfg.groups_per_step] * cfg.steps
    assert all(h["loss"] == 0 and h["rows_trained"] == 0 for h in history)
    assert not _changed(pipe.model, "policy")  # skipped groups leave the policy where it was


@pytest.mark.bad_input
def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="algorithm='ppo'.*grpo, nft"):
        MTRLConfig.for_profile("smoke", algorithm="ppo")
    with pytest.raises(ValueError, match="group_size"):
        MTRLConfig.for_profile("smoke", group_size=1)


@pytest.mark.bad_input
def test_sequences_need_enough_turns(data):
    with pytest.raises(ValueError, match="no sequence has 4 turns"):
        sequences_from(data["multiturn"], n_turns=4)


# ------------------------------------------------------------------------------ evaluation
class PerfectPipe:
    """Renders the true target of whatever (source, instruction) it is asked to edit."""

    def __init__(self, sequences):
        self.truth = {}
        for seq in sequences:
            inputs = [seq.source] + seq.targets[:-1]
            for image, instruction, target in zip(inputs, seq.instructions, seq.targets):
                self.truth[(image.tobytes(), instruction)] = target

    def edit(self, sources, instructions, **kwargs):
        return np.stack([self.truth[(s.tobytes(), i)] for s, i in zip(sources, instructions)])


class IdlePipe:
    def edit(self, sources, instructions, **kwargs):
        return np.asarray(sources).copy()


def test_evaluate_multiturn_perfect_and_idle_editors(data):
    test_set = data["multiturn"].split("test")
    seqs = sequences_from(test_set, n_turns=3)
    perfect = evaluate_multiturn(PerfectPipe(seqs), test_set, CFG, steps=1, seed=0)
    for key in ("turn1_success", "turn2_success", "turn3_success", "marginal_success_turn3", "consistency"):
        assert perfect[key] == 1.0, key
    assert perfect["consistency_l1"] == 0.0 and perfect["n_sequences"] == len(seqs)
    idle = evaluate_multiturn(IdlePipe(), seqs, CFG)
    assert idle["turn1_success"] == 0.0 and idle["consistency_l1"] == 0.0
    assert np.isnan(idle["marginal_success_turn3"])
    # the per-sequence scores behind the figures: one per sequence, their means the figures
    figures, items = evaluate_multiturn(IdlePipe(), seqs, CFG, items=True)
    assert figures == pytest.approx(idle, nan_ok=True)
    for key, values in items.items():
        assert values.shape == (len(seqs),) and values.mean() == pytest.approx(figures[key]), key
    assert {"turn3_success", "turn3_task_success", "consistency"} <= set(items)
