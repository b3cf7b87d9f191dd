"""MT-EditFlow: multi-turn RL for an editor with Flow-GRPO or DiffusionNFT (Sec. 3).

One training step (``MTRLTrainer.step``):

1. **Rollouts** (Sec. 3.1). For each of ``groups_per_step`` instruction sequences, a group of
   ``group_size`` trajectories; turn t edits the model's OWN output of turn t-1 (where exposure
   bias lives), all groups batched together. Each turn is an SDE rollout (Flow-GRPO's step with
   a log-probability, ``flow.sampling.sde_sample``) whose SDE window covers ``train_steps`` steps.
2. **Rewards** (Sec. 3.2): instruction following (IF) and content consistency (CC) on 1-5 per
   turn (``rewards.multiturn``: the judge in a reasoning mode, or the oracle).
3. **Advantages** (Sec. 3.3, ``compute_advantages``): aggregate the turns (mean, min, product or
   last), fuse IF and CC at reward or advantage level, normalise within the group, and
   BROADCAST the trajectory advantage to every turn and every trained step; the ablation
   ``advantage="perturn"`` normalises each turn's fused reward on its own instead. Groups whose
   rewards have zero variance teach nothing: they are left out of the loss and counted.
4. **Policy update**, either
   - Flow-GRPO: PPO-clip on the per-step ratios, recomputed with the current policy on the
     stored trajectories (same states, same next states), plus a KL to the reference (the
     supervised editor = the base with the LoRA adapter disabled); or
   - DiffusionNFT: the final clean sample of every turn re-noised at a random time, the loss
     ``r ||v+ - v||^2 + (1 - r) ||v- - v||^2`` with ``r`` the advantage mapped to [0, 1] and the
     "old" policy a second LoRA adapter that follows the trained one slowly (``policy.ema_update``)
     and also draws the rollouts.

A rollout serves ``updates_per_rollout`` optimizer steps (PPO's reuse: from the second one on
the ratios differ from 1 and the clipping acts). The policy is a LoRA adapter ("policy") on the
frozen supervised clean-pair editor; 8-bit AdamW, clipping, checkpoints and resume come from
``loop.train``; the "old" adapter is checkpointed with the model. A run resumed in the middle
of a rollout cycle draws that cycle's rollout again with the resumed policy (and a "sampled"
judge draws new answers), so only resumes on a cycle boundary continue bit-for-bit.
Single-turn Flow-GRPO is ``n_turns=1`` on single-turn data.

Placement (``core.runtime.placement``): the policy's base (= the reference policy), the text
encoder, the autoencoder and the judge are built on the accelerator's device; the frozen parts
in ``dtype`` ("auto": bf16 on CUDA, fp32 on CPU), the base and the judge quantised when
``quantization`` is "nf4" or "int8" (CUDA only), the LoRA adapters in fp32. The full profile is
FLUX.1-Kontext-dev with a Qwen2.5-VL judge, both NF4, at bf16 autocast.

``evaluate_multiturn`` scores any editor on held-out sequences the way EdiVal-Agent does: turn-k
success (turns 1..k ALL succeeded), per-turn task success, marginal success, consistency.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from nb_edit import world
from nb_edit.core import paths
from nb_edit.core.config import TrainingConfig
from nb_edit.core.images import to_tensor, to_uint8
from nb_edit.core.runtime import Placement, placement, to_device, trainable_in_fp32
from nb_edit.data.sequences import sequences_from
from nb_edit.evaluation.harness import multiturn_items, multiturn_outcomes, multiturn_summary
from nb_edit.flow.pipeline import Conditioning, EditPipeline
from nb_edit.flow.sampling import SdeTrajectory, add_noise, batch_t, randn_like, sde_sample, sde_step_with_logprob
from nb_edit.methods.mtrl.policy import ema_update, grpo_loss, kl_to_reference, nft_loss, normalise_rewards_01
from nb_edit.models.loaders import load_autoencoder, load_editor, load_text_encoder
from nb_edit.models.lora import (
    active_adapter,
    adapters_disabled,
    attach_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    set_active_adapter,
)
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.rewards.formulas import aggregate_turns, broadcast_advantage, fuse_rewards
from nb_edit.rewards.multiturn import MODES, SCORINGS, MultiTurnJudgeReward, MultiTurnOracleReward
from nb_edit.training.loop import (
    LoopConfig,
    check_training_device,
    enable_gradient_checkpointing,
    make_optimizer,
    train,
)

ALGORITHMS = ("grpo", "nft")
ADVANTAGES = ("broadcast", "perturn")
AGGREGATIONS = ("mean", "min", "product", "last")
FUSIONS = ("reward", "advantage")
REWARDS = ("judge", "oracle")
POLICY, OLD = "policy", "old"  # LoRA adapter names


@dataclasses.dataclass
class MTRLConfig(TrainingConfig):
    algorithm: str = "grpo"  # grpo (Flow-GRPO) | nft (DiffusionNFT)
    advantage: str = "broadcast"  # broadcast (MT-EditFlow) | perturn (the ablation)
    aggregation: str = "mean"  # turns -> one score: mean | min | product | last (broadcast only)
    fusion: str = "advantage"  # IF + CC fused at "reward" or "advantage" level
    fusion_weights: tuple[float, float] = (0.5, 0.5)  # (IF, CC)
    reward: str = "judge"  # judge (the VLM) | oracle (a perfect judge)
    reasoning: str = "expected"  # judge reading: expected | sampled | generate
    scoring: str = "multi"  # single | multi (CC against the sequence's original source)
    # "" = the profile's: the shipped supervised clean-pair editor data/pretrained/clean (tiny), FLUX.1-Kontext-dev (full)
    policy_id: str = ""
    judge_id: str = ""  # "" = the profile's: data/pretrained/judge (tiny), Qwen2.5-VL-7B-Instruct (full)
    backbone: str = "auto"  # "auto" (what the model folder holds) | "unet" | "dit"
    n_turns: int = 3
    group_size: int = 4  # G trajectories per sequence
    groups_per_step: int = 2  # sequences per rollout
    sampling_steps: int = 4
    shift: float = 1.0
    noise_level: float = 0.7  # Flow-GRPO's a in std = a sqrt(sigma / (1 - sigma))
    train_steps: int = 2  # SDE window per turn (Flow-GRPO "fast"); the other steps are ODE steps
    updates_per_rollout: int = 2
    clip_range: float = 1e-4  # Flow-GRPO's value: per-pixel mean log-probs move little per step
    kl_weight: float = 0.01
    nft_beta: float = 1.0  # DiffusionNFT's b in v+- = (1 -+ b) v_old +- b v
    nft_old_decay: float = 0.9  # old <- decay * old + (1 - decay) * policy, once per optimizer step
    # DiffusionNFT's reward -> r map, r = 0.5 + 0.5 clip(A / Z, -1, 1) on the group-normalised
    # advantage A: Z fixed as DiffusionNFT defines it (its advantage clip, 5); None = the batch's
    # largest |A| (the best sample of each batch gets r = 1, whatever its reward)
    nft_r_scale: float | None = 5.0
    lora_rank: int = 8
    steps: int = 20  # optimizer steps (tiny: the main job's budget; the seed study sets its own)
    lr: float = 1e-4
    optimizer: str = "adamw8bit"
    grad_clip: float = 1.0
    ema_decay: float | None = None
    checkpoint_every: int = 50
    track_oracle: bool = True  # the oracle's success on the rollouts: the "gold" curve against hacking
    world: dict = dataclasses.field(default_factory=lambda: world.WorldConfig().to_dict())

    ADDED_LATER: ClassVar[dict[str, Any]] = {**TrainingConfig.ADDED_LATER, "nft_r_scale": None}
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {},
        "smoke": dict(steps=2, group_size=2, groups_per_step=2, sampling_steps=2, train_steps=1,
                      updates_per_rollout=1, lora_rank=2, checkpoint_every=1),
        # one GPU: the 12B policy base and the 7B judge in NF4 (LoRA on the 4-bit base, as QLoRA)
        "full": dict(policy_id="black-forest-labs/FLUX.1-Kontext-dev", judge_id="Qwen/Qwen2.5-VL-7B-Instruct",
                     steps=1000, group_size=8, groups_per_step=4, sampling_steps=10, train_steps=2, lr=1e-5,
                     lora_rank=64, kl_weight=0.04, gradient_checkpointing=True, mixed_precision="bf16",
                     quantization="nf4", checkpoint_every=50, track_oracle=False),
    }

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("algorithm", ALGORITHMS), ("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS),
                              ("fusion", FUSIONS), ("reward", REWARDS), ("reasoning", MODES), ("scoring", SCORINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MTRLConfig.{name}={getattr(self, name)!r} is unknown; "
                                 f"use one of {', '.join(allowed)}.")
        if self.group_size < 2:
            raise ValueError(f"MTRLConfig.group_size={self.group_size}: a group needs >= 2 trajectories to normalise.")
        if self.nft_r_scale is not None and not self.nft_r_scale > 0:
            raise ValueError(f"MTRLConfig.nft_r_scale={self.nft_r_scale}: use a positive normaliser (DiffusionNFT: 5) "
                             "or null for the batch's largest |advantage|.")
        if not 1 <= self.train_steps <= self.sampling_steps:
            raise ValueError(f"MTRLConfig.train_steps={self.train_steps} must be in "
                             f"[1, sampling_steps={self.sampling_steps}].")
        if self.algorithm == "grpo" and self.noise_level <= 0:
            raise ValueError("MTRLConfig.noise_level must be > 0 for GRPO: an ODE step has no log-probability.")
        if self.n_turns < 1 or self.updates_per_rollout < 1 or self.groups_per_step < 1:
            raise ValueError("MTRLConfig.n_turns, updates_per_rollout and groups_per_step must be >= 1.")
        self.fusion_weights = tuple(self.fusion_weights)

    @property
    def world_config(self) -> world.WorldConfig:
        return world.WorldConfig.from_dict(self.world)


# ------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class SequenceBatch:
    sources: Tensor  # [n_groups, 3, H, W]
    instructions: list[list[str]]  # [n_groups][T]
    edits: list[list[world.Edit]] | None  # [n_groups][T]
    cycle: int  # which rollout this batch feeds


# ------------------------------------------------------------------------------------ rollouts
@dataclasses.dataclass
class Rollout:
    """N = groups x G trajectories of T turns, rows group-major (row n belongs to group n // G)."""

    group_ids: Tensor  # [N]
    original: Tensor  # [N, 3, H, W]
    turn_sources: list[Tensor]  # T x [N, 3, H, W]: the image each turn edited
    outputs: list[Tensor]  # T x [N, 3, H, W]: each turn's result, as the user sees it (uint8 grid)
    instructions: list[list[str]]  # T x N
    trajectories: list[SdeTrajectory]  # T
    conditions: list[Conditioning]  # T: text and source latents, reused by the loss
    edits: list[list[world.Edit]] | None = None  # T x N

    @property
    def shape(self) -> tuple[int, int]:
        return self.group_ids.shape[0], len(self.outputs)


def _as_seen(images: Tensor) -> Tensor:
    """Decoded images on the uint8 grid: exactly what the next turn (and a user) receives."""
    return to_tensor(to_uint8(images)).to(images.device)


@torch.no_grad()
def rollout(pipe, sources: Tensor, instructions: Sequence[Sequence[str]], group_size: int, *, steps: int,
            noise_level: float, train_steps: int | None, generator: torch.Generator,
            edits: Sequence[Sequence[world.Edit]] | None = None) -> Rollout:
    """MT-EditFlow's multi-turn rollout: G trajectories per sequence, turn t on turn t-1's output.

    ``pipe`` is an :class:`EditPipeline` (or anything with ``condition``, ``velocity_fn``,
    ``sigmas`` and ``autoencoder``); ``sources`` ``[n_groups, 3, H, W]`` in [-1, 1];
    ``instructions[g][t]``. The adapter active on ``pipe.model`` is the policy that acts.
    """
    n_groups = sources.shape[0]
    if len(instructions) != n_groups:
        raise ValueError(f"{len(instructions)} instruction lists for {n_groups} sources; pass one list per sequence.")
    n_turns = len(instructions[0])
    if any(len(row) != n_turns for row in instructions):
        raise ValueError("every sequence of a batch must have the same number of turns.")
    group_ids = torch.arange(n_groups).repeat_interleave(group_size)
    original = sources.repeat_interleave(group_size, dim=0)
    current, sigmas = original, pipe.sigmas(steps)
    turn_sources, outputs, texts_per_turn, trajectories, conditions = [], [], [], [], []
    for turn in range(n_turns):
        texts = [instructions[int(g)][turn] for g in group_ids]
        cond = pipe.condition(texts, current)  # this turn edits the previous turn's own output
        if cond.source_latents is None:
            raise ValueError("pipe.condition returned no source latents; an editor needs its source image.")
        noise = randn_like(cond.source_latents, generator)
        trajectory = sde_sample(pipe.velocity_fn(cond), noise, sigmas, noise_level, train_steps, generator)
        edited = _as_seen(pipe.autoencoder.decode(trajectory.x0))
        turn_sources.append(current)
        outputs.append(edited)
        texts_per_turn.append(texts)
        trajectories.append(trajectory)
        conditions.append(cond)
        current = edited
    per_turn_edits = None
    if edits is not None:
        per_turn_edits = [[edits[int(g)][turn] for g in group_ids] for turn in range(n_turns)]
    return Rollout(group_ids, original, turn_sources, outputs, texts_per_turn, trajectories, conditions, per_turn_edits)


# ------------------------------------------------------------------------------------ advantages
@dataclasses.dataclass
class Advantages:
    per_step: Tensor  # [N, T, S]: the advantage of every trained step of every turn
    keep: Tensor  # [N, T] bool: rows that enter the loss (not in a zero-variance group)
    n_groups: int  # groups normalised (group-turn pairs for "perturn")
    n_zero_var: int  # of those, the ones with flat rewards: skipped
    n_imputed: int  # failed judge scores (NaN) replaced by their group's mean


def _impute_failures(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, int]:
    """NaN scores (judge failures) take the mean of their group's valid scores at that turn, so
    they add no signal either way; a turn the judge failed for the whole group becomes flat."""
    missing = ~torch.isfinite(scores)
    if not missing.any():
        return scores, 0
    filled = scores.clone()
    for group in torch.unique(group_ids):
        rows = group_ids == group
        block = scores[rows]
        valid = torch.isfinite(block)
        mean = torch.where(valid, block, 0.0).sum(0) / valid.sum(0).clamp_min(1)
        mean = torch.where(valid.any(0), mean, torch.full_like(mean, 3.0))  # all failed: a constant
        filled[rows] = torch.where(valid, block, mean.expand_as(block))
    return filled, int(missing.sum())


def _count_groups(mask: Tensor, group_ids: Tensor) -> int:
    return int(torch.unique(group_ids[mask]).numel())


def compute_advantages(if_scores: Tensor, cc_scores: Tensor, group_ids: Tensor, n_steps: int, *,
                       aggregation: str = "mean", fusion: str = "advantage", advantage: str = "broadcast",
                       weights: tuple[float, float] = (0.5, 0.5)) -> Advantages:
    """MT-EditFlow's advantages from per-turn scores ``[N, T]``.

    ``broadcast``: aggregate each reward over the turns, fuse, normalise in the group; the one
    trajectory advantage goes to every turn and step. ``perturn``: fuse and normalise each turn's
    rewards on their own (``aggregation`` is unused).
    """
    if if_scores.shape != cc_scores.shape or if_scores.dim() != 2 or group_ids.shape != if_scores.shape[:1]:
        raise ValueError(f"if_scores {tuple(if_scores.shape)}, cc_scores {tuple(cc_scores.shape)} must be [N, T] "
                         f"and group_ids {tuple(group_ids.shape)} [N].")
    group_ids = group_ids.to(if_scores.device)
    if_scores, n_if = _impute_failures(if_scores.float(), group_ids)
    cc_scores, n_cc = _impute_failures(cc_scores.float(), group_ids)
    n_turns = if_scores.shape[1]
    if advantage == "broadcast":
        if_traj = aggregate_turns(if_scores, aggregation)  # MT-EditFlow: one score per trajectory
        cc_traj = aggregate_turns(cc_scores, aggregation)
        adv, flat = fuse_rewards(if_traj, cc_traj, group_ids, fusion, weights)  # [N]
        keep = (~flat)[:, None].expand(-1, n_turns)
        n_groups, n_zero = int(torch.unique(group_ids).numel()), _count_groups(flat, group_ids)
    elif advantage == "perturn":
        columns = [fuse_rewards(if_scores[:, t], cc_scores[:, t], group_ids, fusion, weights) for t in range(n_turns)]
        adv = torch.stack([a for a, _ in columns], dim=1)  # [N, T]
        flat = torch.stack([f for _, f in columns], dim=1)
        keep = ~flat
        n_groups = int(torch.unique(group_ids).numel()) * n_turns
        n_zero = sum(_count_groups(flat[:, t], group_ids) for t in range(n_turns))
    else:
        raise ValueError(f"advantage={advantage!r} is unknown; use one of {', '.join(ADVANTAGES)}.")
    per_step = broadcast_advantage(adv, n_turns, n_steps)  # every turn and every trained step
    return Advantages(per_step, keep.contiguous(), n_groups, n_zero, n_if + n_cc)


# ------------------------------------------------------------------------------------ trainer
def _rows(cond: Conditioning, rows: Tensor) -> Conditioning:
    pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
    return Conditioning(cond.text_states[rows.to(cond.text_states.device)], pick(cond.pooled),
                        pick(cond.source_latents), pick(cond.extra_time_embedding))


def make_reward(cfg: MTRLConfig, device: torch.device | str | Placement | None = None):
    """The per-turn reward the config asks for: the judge in its reasoning mode, or the oracle.

    The judge loads on ``device`` (None: the accelerator's) in the config's dtype and quantisation."""
    if cfg.reward == "oracle":
        return MultiTurnOracleReward(cfg.world_config, cfg.scoring)
    place = device if isinstance(device, Placement) else placement(cfg, device)
    judge = VLMJudge.from_pretrained(cfg.judge_id or paths.pretrained_dir() / "judge", quantization=place.quantization,
                                     dtype=place.dtype, device=place.device).freeze()
    return MultiTurnJudgeReward(judge, cfg.reasoning, cfg.scoring, torch.Generator().manual_seed(cfg.seed + 17))


class MTRLTrainer:
    """The policy (LoRA on the supervised editor), the reward and the sequences; ``step`` is the loop's."""

    def __init__(self, cfg: MTRLConfig, dataset, device: torch.device | str | None = None, reward=None):
        """``device`` None: the accelerator's (what ``fit`` trains on)."""
        self.cfg = cfg
        self.placement = place = placement(cfg, device)
        self.device = place.device
        policy_path = Path(cfg.policy_id) if cfg.policy_id else paths.pretrained_dir() / "clean"
        # frozen base = the reference policy
        self.model = to_device(load_editor(policy_path, cfg.backbone, quantization=place.quantization,
                                           dtype=place.dtype, device=self.device), self.device)
        attach_lora(self.model, cfg.lora_rank, adapter_name=POLICY)
        if cfg.algorithm == "nft":  # the old policy starts as an exact copy of the trained one
            attach_lora(self.model, cfg.lora_rank, adapter_name=OLD)
            load_lora_state_dict(self.model, {n.replace(f".{POLICY}.", f".{OLD}."): p
                                              for n, p in lora_state_dict(self.model, POLICY).items()})
            set_active_adapter(self.model, POLICY)
        trainable_in_fp32(self.model)  # the adapters, made in the base's dtype
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, "MTRLConfig.gradient_checkpointing")
        self.pipe = EditPipeline(self.model, load_text_encoder(policy_path, dtype=place.dtype, device=self.device),
                                 load_autoencoder(policy_path, dtype=place.dtype, device=self.device), cfg.shift)
        self.reward = reward if reward is not None else make_reward(cfg, place)
        if any(r.split == "train" for r in dataset) and any(r.split != "train" for r in dataset):
            dataset = dataset.split("train")
        self.sequences = sequences_from(dataset, cfg.n_turns, cfg.world_config)
        if cfg.reward == "oracle" and self.sequences[0].edits is None:
            raise ValueError("reward='oracle' needs the true edits (edit_json) of every record; use ShapesWorld data.")
        self._cache: tuple[int, Rollout, Advantages, dict[str, float]] | None = None

    # -- data ----------------------------------------------------------------------------
    def batch(self, step: int) -> SequenceBatch:
        cfg = self.cfg
        cycle = step // cfg.updates_per_rollout
        rng = np.random.default_rng([cfg.seed, cycle, 23])  # data position = rollout cycle: resumable
        pick = rng.choice(len(self.sequences), cfg.groups_per_step, replace=len(self.sequences) < cfg.groups_per_step)
        seqs = [self.sequences[int(i)] for i in pick]
        edits = [s.edits for s in seqs] if all(s.edits is not None for s in seqs) else None
        return SequenceBatch(to_tensor(np.stack([s.source for s in seqs])).to(self.device),
                             [s.instructions for s in seqs], edits, cycle)

    # -- rollouts and rewards ------------------------------------------------------------------
    def collect(self, batch: SequenceBatch) -> tuple[Rollout, Advantages, dict[str, float]]:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch.cycle)
        acting = OLD if cfg.algorithm == "nft" else POLICY  # DiffusionNFT samples with the old policy
        with active_adapter(self.model, acting):
            ro = rollout(self.pipe, batch.sources, batch.instructions, cfg.group_size, steps=cfg.sampling_steps,
                         noise_level=cfg.noise_level, train_steps=cfg.train_steps, generator=gen, edits=batch.edits)
        scores = self.reward.score_turns(ro.original, ro.turn_sources, ro.instructions, ro.outputs, edits=ro.edits)
        adv = compute_advantages(scores["if"], scores["cc"], ro.group_ids, cfg.train_steps,
                                 aggregation=cfg.aggregation, fusion=cfg.fusion, advantage=cfg.advantage,
                                 weights=cfg.fusion_weights)
        logs = {"reward_if": float(torch.nanmean(scores["if"])), "reward_cc": float(torch.nanmean(scores["cc"])),
                "judge_failures": float(scores["n_failures"]), "groups": float(adv.n_groups),
                "zero_var_groups": float(adv.n_zero_var), "rows_trained": float(adv.keep.float().mean())}
        for turn in range(ro.shape[1]):
            logs[f"reward_if_turn{turn + 1}"] = float(torch.nanmean(scores["if"][:, turn]))
            logs[f"reward_cc_turn{turn + 1}"] = float(torch.nanmean(scores["cc"][:, turn]))
        if cfg.track_oracle and ro.edits is not None:
            logs.update(self.oracle_curve(ro))
        return ro, adv, logs

    def oracle_curve(self, ro: Rollout) -> dict[str, float]:
        """The oracle's turn-k success on the rollouts: the "gold" metric beside the judge's reward."""
        world_cfg = self.cfg.world_config
        success = np.array([[world.judge(s, e, o, world_cfg).success
                             for s, e, o in zip(to_uint8(ro.turn_sources[t]), ro.edits[t], to_uint8(ro.outputs[t]))]
                            for t in range(ro.shape[1])]).T  # [N, T]
        so_far = np.cumprod(success, axis=1)
        return {f"rollout_oracle_turn{k + 1}_success": float(so_far[:, k].mean()) for k in range(ro.shape[1])}

    # -- losses ----------------------------------------------------------------------------
    def grpo_objective(self, ro: Rollout, adv: Advantages) -> tuple[Tensor, dict[str, float]]:
        """Flow-GRPO: PPO-clip on ratios recomputed on the stored transitions, KL to the reference."""
        cfg = self.cfg
        new_lp, old_lp, advantages, kls = [], [], [], []
        for turn, traj in enumerate(ro.trajectories):
            rows = adv.keep[:, turn].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            fn = self.pipe.velocity_fn(_rows(ro.conditions[turn], rows))
            turn_lp, turn_kl = [], []
            for k in traj.train_steps:
                x, x_next = traj.latents[k][rows.to(self.device)], traj.latents[k + 1][rows.to(self.device)]
                sigma, sigma_next = float(traj.sigmas[k]), float(traj.sigmas[k + 1])
                _, log_prob, mean, std = sde_step_with_logprob(x, fn(x, batch_t(sigma, x)), sigma, sigma_next,
                                                               traj.noise_level, prev_sample=x_next,
                                                               sigma_cap=traj.sigma_cap)
                turn_lp.append(log_prob)
                if cfg.kl_weight > 0:
                    with torch.no_grad(), adapters_disabled(self.model):  # the reference: the supervised editor
                        v_ref = fn(x, batch_t(sigma, x))
                    _, _, mean_ref, _ = sde_step_with_logprob(x, v_ref, sigma, sigma_next, traj.noise_level,
                                                              prev_sample=x_next, sigma_cap=traj.sigma_cap)
                    turn_kl.append(kl_to_reference(mean, mean_ref, std))  # ||mu - mu_ref||^2 / (2 std^2)
            new_lp.append(torch.stack(turn_lp, dim=1))
            old_lp.append(traj.log_probs[rows.to(traj.log_probs.device)].to(self.device))
            advantages.append(adv.per_step[rows, turn].to(self.device))  # the broadcast advantage, per step
            if turn_kl:
                kls.append(torch.stack(turn_kl, dim=1))
        if not new_lp:
            return self._nothing_to_learn(), {}
        return grpo_loss(torch.cat(new_lp), torch.cat(old_lp), torch.cat(advantages), cfg.clip_range,
                         kl=torch.cat(kls) if kls else None, kl_weight=cfg.kl_weight)

    def nft_objective(self, ro: Rollout, adv: Advantages, step: int) -> tuple[Tensor, dict[str, float]]:
        """DiffusionNFT on each turn's final clean sample, re-noised at a random time."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 7)
        v_theta, v_old, v_target, picked = [], [], [], []
        for turn, traj in enumerate(ro.trajectories):
            rows = adv.keep[:, turn].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            x0 = traj.x0[rows.to(self.device)]
            noise = randn_like(x0, gen)
            t = torch.rand(x0.shape[0], generator=gen).to(self.device)
            x_t = add_noise(x0, noise, t)
            fn = self.pipe.velocity_fn(_rows(ro.conditions[turn], rows))
            v_theta.append(fn(x_t, t))
            with torch.no_grad(), active_adapter(self.model, OLD):
                v_old.append(fn(x_t, t))
            v_target.append(noise - x0)  # flow-matching velocity v = eps - x0
            picked.append(adv.per_step[rows, turn, 0])
        if not v_theta:
            return self._nothing_to_learn(), {}
        r = normalise_rewards_01(torch.cat(picked), self.cfg.nft_r_scale).to(self.device)  # advantage -> r in [0, 1]
        return nft_loss(torch.cat(v_theta), torch.cat(v_old), torch.cat(v_target), r, self.cfg.nft_beta)

    def _nothing_to_learn(self) -> Tensor:
        """A zero loss tied to the policy (every group was flat): the loop's backward still works."""
        return sum(p.sum() for p in lora_parameters(self.model, POLICY)) * 0.0

    def _follow_policy(self) -> None:
        """DiffusionNFT's old policy: old <- decay * old + (1 - decay) * policy."""
        named = dict(self.model.named_parameters())
        old = {n.replace(f".{OLD}.", "."): p for n, p in named.items() if "lora_" in n and f".{OLD}." in n}
        new = {n.replace(f".{POLICY}.", "."): p for n, p in named.items() if "lora_" in n and f".{POLICY}." in n}
        ema_update(old, new, self.cfg.nft_old_decay)

    def step(self, batch: SequenceBatch, step: int) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.algorithm == "nft":
            self._follow_policy()  # catches up with the optimizer step just taken (none before step 0)
        logs: dict[str, Any] = {}
        if self._cache is None or self._cache[0] != batch.cycle:
            ro, adv, rollout_logs = self.collect(batch)
            self._cache = (batch.cycle, ro, adv, rollout_logs)
            logs.update(rollout_logs)  # logged once per rollout
        _, ro, adv, _ = self._cache
        if cfg.algorithm == "grpo":
            loss, stats = self.grpo_objective(ro, adv)
        else:
            loss, stats = self.nft_objective(ro, adv, step)
        logs.update(stats)
        return {"loss": loss, **logs}

    def fit(self, ckpt_dir: Path, progress: bool = True):
        cfg = self.cfg
        check_training_device(self.device, "MTRLTrainer")
        loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, optimizer=cfg.optimizer, grad_clip=cfg.grad_clip,
                          ema_decay=cfg.ema_decay, checkpoint_every=cfg.checkpoint_every,
                          mixed_precision=self.placement.mixed_precision, seed=cfg.seed)
        optimizer = make_optimizer(lora_parameters(self.model, POLICY), loop)  # the old adapter is never optimised
        return train(self.step, {"editor": self.model}, config=loop, ckpt_dir=ckpt_dir, batch_fn=self.batch,
                     optimizers={"main": optimizer}, run_config=cfg.identity(), progress=progress)

    def edit_pipeline(self) -> EditPipeline:
        set_active_adapter(self.model, POLICY)
        return self.pipe


def train_mtrl(cfg: MTRLConfig, dataset, ckpt_dir: Path, device: torch.device | str | None = None, reward=None,
               progress: bool = True) -> tuple[EditPipeline, Any]:
    """Train MT-EditFlow on a multi-turn dataset (its train split); returns (pipeline, history).

    ``reward`` overrides the one the config names (anything with ``score_turns``); ``device``
    None is the accelerator's device (CUDA when present, else CPU).
    """
    torch.manual_seed(cfg.seed)
    trainer = MTRLTrainer(cfg, dataset, device, reward)
    history = trainer.fit(Path(ckpt_dir), progress=progress)
    return trainer.edit_pipeline(), history


# ------------------------------------------------------------------------------------ evaluation
def evaluate_multiturn(pipeline, sequences, world_cfg: world.WorldConfig | None = None, steps: int = 4,
                       seed: int = 0, n_turns: int | None = None, items: bool = False):
    """EdiVal-style multi-turn scores of ``pipeline`` (anything with ``edit``) by the oracle.

    ``sequences``: a dataset (e.g. ``shapesworld(settings)["multiturn"].split("test")``) or a
    list of :class:`TurnSequence`. Turn t edits the pipeline's own output of turn t-1 and is
    judged against that input and the turn's edit: success = followed AND preserved.

    - ``turn{k}_success``: share of sequences whose turns 1..k ALL succeeded;
    - ``turn{k}_task_success``: share whose turn k succeeded, whatever came before;
    - ``marginal_success_turn{k}``: success at turn k given turns 1..k-1 succeeded (NaN if none did);
    - ``consistency``: the oracle's preserved share over all turns (nothing outside the edit
      changed beyond its tolerances); ``consistency_l1``: mean |output - input| on [-1, 1] over the
      pixels the turn's edit does not touch (``Edit.region`` of the ideal scenes), a finer reading
      of the same thing; ``followed``: the oracle's followed share.

    With ``items`` it returns ``(figures, per-sequence scores)``, the second from
    ``harness.multiturn_items`` (what ``runs.record_items`` keeps for the claims' paired tests).
    """
    world_cfg = world_cfg or world.WorldConfig()
    seqs = sequences if isinstance(sequences, list) else sequences_from(sequences, n_turns, world_cfg)
    outcomes = multiturn_outcomes(pipeline, seqs, world_cfg, steps=steps, seed=seed, n_turns=n_turns)
    return (multiturn_summary(outcomes), multiturn_items(outcomes)) if items else multiturn_summary(outcomes)
