"""The reward condition of Multi-Reward as Condition (Sec. 4.2-4.3).

A training triplet's judge feedback - three 0-5 scores (instruction following, detail
preserving, generation quality) and a failure text per perspective - becomes an extra input
of the editor, so that noisy supervision is explained rather than imitated:

* scores: each score -> sinusoidal embedding -> concatenated -> MLP (Multi-Reward eq. 6);
* failure texts joined by "; " -> the editor's own text encoder, POOLED output -> linear
  layers (eq. 5);
* the two embeddings, each with a type embedding, form the reward condition ``c_R``:
  (1) ``Linear_2(c_R)`` reaches every block: by default ADDED to the timestep embedding, which
  every resnet block reads (``Editor.forward(extra_time_embedding=...)``); with
  ``injection="blocks"`` as eq. 3 writes it, ``z_i = UB_{i-1}(z_{i-1}) + Linear_2(c_R)``, one
  linear per UNet block added to that block's output (UNet only); and (2) ``Linear_1(c_R)``
  gives 2 key/value tokens of a small cross-attention whose queries are the feature tokens
  right after the input layer (UNet ``conv_in``, DiT ``x_embedder``):
  ``Z'' = Z' + CA(Z', Linear_1(c_R))`` (eq. 2).

Both paths end in ZERO-initialised layers, so a pretrained editor wrapped in
:class:`RewardConditionedEditor` computes exactly what it computed before training.

Its Table 4 ablates the two kinds of reward information: ``parts=("scores",)`` reads the scores
alone (the text token is a constant), ``parts=("text",)`` the failure texts alone (the score
token is the "unknown" one); the module is otherwise the same.

At inference the condition asks for the best: scores (5, 5, 5) and the text
"None; None; None", in every classifier-free-guidance branch (:class:`RewardEditPipeline`).
A score row holding NaN means "unknown" (conditioning dropout, or a score the judge failed on);
its score embedding is a learned one.

Reward guidance (an option beyond the paper, off by default): because conditioning dropout
teaches the editor the "unknown" condition too, classifier-free guidance can also run over the
reward, ``v = v_text(c_R) + (w - 1) (v(c_R) - v(c_unknown))`` (``edit(..., reward_guidance=w)``;
with text guidance 1 this is ``v(c_unknown) + w (v(c_R) - v(c_unknown))``). ``w = 1`` is the
paper's sampler; ``w > 1`` amplifies whatever the editor read from its condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from nb_edit.core.images import check_image_tensor, to_tensor
from nb_edit.flow.losses import cfg_velocity
from nb_edit.flow.pipeline import Conditioning, EditPipeline
from nb_edit.rewards.single_turn import FAILURE_JOINER, NO_FAILURE, UNKNOWN_TEXT

BEST_SCORES = (5.0, 5.0, 5.0)
BEST_TEXT = FAILURE_JOINER.join([NO_FAILURE] * 3)  # "None; None; None"
# Smallest sinusoid frequency 1 / SCORE_MAX_PERIOD: its phase stays below pi / 2 over the 0-5
# range, so at least one component is monotone in the score.
SCORE_MAX_PERIOD = 10
# where Linear_2(c_R) enters (eq. 3): the timestep embedding, or the output of every UNet block
INJECTIONS = ("time_embedding", "blocks")
# what the condition reads (Table 4): the scores, the failure texts, or both (the method)
REWARD_PARTS = ("scores", "text")


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = SCORE_MAX_PERIOD) -> Tensor:
    """Absolute positional encoding of real values (Vaswani et al.): ``[...] -> [..., dim]``.

    ``dim`` must be even; frequencies run from 1 to ``1 / max_period`` (diffusers' timestep
    embedding with these settings).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding needs an even dim; got {dim}.")
    flat = values.reshape(-1).float()
    emb = get_timestep_embedding(flat, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)
    return emb.reshape(*values.shape, dim)


def join_failure_texts(following: str, preserving: str, quality: str) -> str:
    """The reward text ``Concat[T_f, T_p, T_q]`` of Multi-Reward eq. 5."""
    return FAILURE_JOINER.join([following, preserving, quality])


@dataclass
class RewardInputs:
    """One batch's reward condition before embedding: scores [B, 3] (NaN row = unknown) and the
    text encoder's pooled output of the joined failure texts [B, P]."""

    scores: Tensor
    text_pooled: Tensor


class RewardCondition(nn.Module):
    """The multi-reward condition module (MRC) and the reward encoder.

    ``forward(RewardInputs) -> (time_embedding [B, T] or None, tokens [B, 2, C], per-block
    offsets [B, C_i])``; ``attend(features, tokens)`` is the residual cross-attention on the first
    feature tokens. With ``block_dims`` (the channels of each UNet block's output) eq. 3 is taken
    as written, one ``Linear_2`` per block, and no time embedding is returned. ``parts`` names what
    it reads (``REWARD_PARTS``; one of the two is Table 4's ablation).
    """

    def __init__(self, text_dim: int, time_embedding_dim: int, feature_dim: int, score_dim: int = 32,
                 hidden_dim: int = 64, heads: int = 4, block_dims: Sequence[int] = (),
                 parts: Sequence[str] = REWARD_PARTS):
        super().__init__()
        if feature_dim % heads:
            raise ValueError(f"feature_dim={feature_dim} must be divisible by heads={heads}.")
        self.parts = tuple(part for part in REWARD_PARTS if part in parts)
        if not self.parts or len(self.parts) != len(tuple(parts)):
            raise ValueError(f"parts={tuple(parts)!r}: name one or both of {REWARD_PARTS}, each once.")
        self.score_dim = score_dim
        self.score_mlp = nn.Sequential(nn.Linear(3 * score_dim, hidden_dim), nn.SiLU(),
                                       nn.Linear(hidden_dim, hidden_dim))  # Multi-Reward eq. 6
        self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.unknown_scores = nn.Parameter(torch.zeros(hidden_dim))  # E_s of a dropped condition
        self.type_embedding = nn.Parameter(0.02 * torch.randn(2, hidden_dim))  # score token vs text token
        self.to_time = nn.Linear(2 * hidden_dim, time_embedding_dim)  # Linear_2 of eq. 3, via the time embedding
        self.to_blocks = nn.ModuleList(nn.Linear(2 * hidden_dim, d) for d in block_dims)  # eq. 3 as written
        self.to_tokens = nn.Linear(hidden_dim, feature_dim)  # Linear_1 of eq. 2
        self.norm = nn.LayerNorm(feature_dim)
        self.attention = Attention(query_dim=feature_dim, heads=heads, dim_head=feature_dim // heads, bias=True)
        for layer in (self.to_time, self.attention.to_out[0], *self.to_blocks):  # zero init: the editor is unchanged at start
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def for_editor(cls, editor, text_dim: int, injection: str = "time_embedding", **sizes) -> "RewardCondition":
        """Sized to an :class:`~nb_edit.models.editors.Editor` and its text encoder's pooled width;
        ``injection`` "time_embedding" or "blocks" (eq. 3 as written: a UNet's blocks); ``sizes``
        the other arguments (``parts`` among them)."""
        if injection not in INJECTIONS:
            raise ValueError(f"injection={injection!r} is unknown; use one of {', '.join(INJECTIONS)}.")
        if injection == "blocks" and not hasattr(editor, "block_modules"):
            raise ValueError(f"injection='blocks' adds the condition after each U-Net block (Multi-Reward eq. 3); "
                             f"{type(editor).__name__} has none: use injection='time_embedding'.")
        block_dims = [dim for _, dim in editor.block_modules()] if injection == "blocks" else []
        return cls(text_dim, editor.time_embedding_dim, editor.input_feature_dim, block_dims=block_dims, **sizes)

    def forward(self, reward: RewardInputs) -> tuple[Tensor | None, Tensor, list[Tensor]]:
        scores, pooled = reward.scores, reward.text_pooled
        if scores.ndim != 2 or scores.shape[1] != 3 or pooled.shape[0] != scores.shape[0]:
            raise ValueError(f"reward scores must be [B, 3] (following, preserving, quality) with pooled [B, P]; "
                             f"got {tuple(scores.shape)} and {tuple(pooled.shape)}.")
        dtype = self.to_time.weight.dtype
        unknown = torch.isnan(scores).any(dim=1, keepdim=True)
        # Concat[PE(S_f), PE(S_p), PE(S_q)]
        pe = sinusoidal_embedding(torch.nan_to_num(scores), self.score_dim).flatten(1)
        score_emb = torch.where(unknown, self.unknown_scores.to(dtype), self.score_mlp(pe.to(dtype)))  # E_s
        if "scores" not in self.parts:  # Table 4, text alone: every row's score token is the "unknown" one
            score_emb = self.unknown_scores.to(dtype).expand_as(score_emb)
        if "text" not in self.parts:  # Table 4, scores alone: the text token is a constant
            pooled = torch.zeros_like(pooled)
        text_emb = self.text_proj(pooled.to(dtype))  # from E_t
        tokens = torch.stack([score_emb, text_emb], dim=1) + self.type_embedding  # c_R: 2 tokens
        flat = tokens.flatten(1)
        if self.to_blocks:  # z_i = UB_{i-1}(z_{i-1}) + Linear_2(c_R), one Linear_2 per block
            return None, self.to_tokens(tokens), [layer(flat) for layer in self.to_blocks]
        return self.to_time(flat), self.to_tokens(tokens), []

    def attend(self, features: Tensor, tokens: Tensor) -> Tensor:
        """``Z'' = Z' + CA(norm(Z'), tokens)`` (Multi-Reward eq. 2) on [B, C, h, w] or [B, N, C] features."""
        spatial = features.ndim == 4
        queries = features.flatten(2).transpose(1, 2) if spatial else features
        out = queries + self.attention(self.norm(queries), encoder_hidden_states=tokens.to(queries.dtype))
        return out.transpose(1, 2).reshape(features.shape) if spatial else out

    @contextmanager
    def attending(self, editor, tokens: Tensor, block_offsets: Sequence[Tensor] = ()):
        """Within the block, ``editor``'s first feature tokens attend to ``tokens`` and each UNet
        block's output gets its offset added (forward hooks)."""
        handles = [editor.input_embedding_module().register_forward_hook(lambda _m, _i, out: self.attend(out, tokens))]
        if block_offsets:
            for (block, _), offset in zip(editor.block_modules(), block_offsets):
                handles.append(block.register_forward_hook(lambda _m, _i, out, o=offset: _add_to_block(out, o)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _add_to_block(out, offset: Tensor):
    """A UNet block's output plus ``offset`` [B, C] on every pixel (down blocks also return their
    skip features, which stay as they are)."""
    if isinstance(out, tuple):
        return (_add_to_block(out[0], offset), *out[1:])
    return out + offset.to(out.dtype)[:, :, None, None]


class RewardConditionedEditor(nn.Module):
    """An editor plus its reward condition, with the Editor call signature and ``reward=``.

    ``reward=None`` runs the bare editor (what it computed before this module existed).
    """

    def __init__(self, editor, condition: RewardCondition):
        super().__init__()
        self.editor, self.condition = editor, condition

    @property
    def latent_channels(self) -> int:
        return self.editor.latent_channels

    @property
    def takes_reference(self) -> bool:
        return self.editor.takes_reference

    def forward(self, x_t: Tensor, t: Tensor, text_states: Tensor, pooled: Tensor,
                source_latents: Tensor | None = None, extra_time_embedding: Tensor | None = None,
                reward: RewardInputs | None = None) -> Tensor:
        if reward is None:
            return self.editor(x_t, t, text_states, pooled, source_latents, extra_time_embedding)
        if reward.scores.shape[0] != x_t.shape[0]:
            raise ValueError(f"reward has {reward.scores.shape[0]} rows for a batch of {x_t.shape[0]}; "
                             "build it for the same batch (RewardEditPipeline.condition does).")
        time_embedding, tokens, block_offsets = self.condition(reward)
        if time_embedding is None:
            time_embedding = extra_time_embedding
        elif extra_time_embedding is not None:
            time_embedding = time_embedding + extra_time_embedding
        with self.condition.attending(self.editor, tokens, block_offsets):
            return self.editor(x_t, t, text_states, pooled, source_latents, time_embedding)  # eq. 3


@dataclass
class RewardConditioning(Conditioning):
    """:class:`~nb_edit.flow.pipeline.Conditioning` plus the reward condition (None: no condition)."""

    reward: RewardInputs | None = None


def _texts_per_sample(texts: str | Sequence[str], batch: int) -> list[str]:
    """One failure text for all samples, or one per sample."""
    rows = [texts] * batch if isinstance(texts, str) else list(texts)
    if len(rows) != batch:
        raise ValueError(f"failure_texts has {len(rows)} entries for a batch of {batch}; give one for all or one "
                         "per sample.")
    return [str(t) for t in rows]


class RewardEditPipeline(EditPipeline):
    """An :class:`~nb_edit.flow.pipeline.EditPipeline` whose conditions carry reward scores and texts.

    ``edit(..., scores=(5, 5, 5), failure_texts="None; None; None")`` are the defaults; the same
    reward condition is used in the conditional and the unconditional CFG branch. With a bare
    editor as ``model`` (the no-reward baseline) the reward arguments are accepted and ignored.
    """

    @property
    def uses_reward(self) -> bool:
        return isinstance(self.model, RewardConditionedEditor)

    def reward_inputs(self, batch: int, scores=BEST_SCORES, failure_texts=BEST_TEXT) -> RewardInputs:
        """Scores (one triple for all, or [B, 3]; NaN = unknown) and joined failure texts (one, or B)."""
        array = np.asarray(scores, dtype=np.float32)
        if array.shape == (3,):
            array = np.tile(array, (batch, 1))  # one triple for the whole batch
        if array.shape != (batch, 3):
            raise ValueError(f"scores must be 3 numbers (following, preserving, quality) or [B={batch}, 3]; "
                             f"got shape {array.shape}.")
        score_rows = torch.from_numpy(array)
        finite = score_rows[~torch.isnan(score_rows)]
        if bool(((finite < 0) | (finite > 5)).any()):
            raise ValueError("reward scores must lie in [0, 5] (NaN marks an unknown condition).")
        with torch.no_grad():
            _, pooled, _ = self.text_encoder.encode(_texts_per_sample(failure_texts, batch))
        return RewardInputs(score_rows.to(self.device), pooled)

    def condition(self, texts: Sequence[str], sources: Tensor | None = None, grad_text: bool = False,
                  scores=BEST_SCORES, failure_texts=BEST_TEXT) -> RewardConditioning:
        base = super().condition(texts, sources, grad_text)
        reward = self.reward_inputs(len(texts), scores, failure_texts) if self.uses_reward else None
        return RewardConditioning(base.text_states, base.pooled, base.source_latents, base.extra_time_embedding, reward)

    def null_condition(self, cond: Conditioning) -> RewardConditioning:
        null = super().null_condition(cond)  # empty text; source and reward kept (every CFG branch)
        return RewardConditioning(null.text_states, null.pooled, null.source_latents, null.extra_time_embedding,
                                  getattr(cond, "reward", None))

    def unknown_reward(self, cond: RewardConditioning) -> RewardConditioning:
        """The same batch with the reward dropped to "unknown" (NaN scores, ``UNKNOWN_TEXT``), as
        conditioning dropout shows it in training."""
        batch = cond.text_states.shape[0]
        unknown = self.reward_inputs(batch, np.full((batch, 3), np.nan, np.float32), UNKNOWN_TEXT)
        return RewardConditioning(cond.text_states, cond.pooled, cond.source_latents, cond.extra_time_embedding,
                                  unknown)

    def guided_velocity_fn(self, cond: Conditioning, guidance: float = 1.0, model=None,
                           reward_guidance: float = 1.0):
        """Text CFG (:meth:`EditPipeline.guided_velocity_fn`, the requested reward in both branches),
        plus reward guidance ``(w - 1) (v(c_R) - v(c_unknown))`` when ``reward_guidance = w != 1``."""
        text_fn = super().guided_velocity_fn(cond, guidance, model)
        if reward_guidance == 1.0 or not self.uses_reward or getattr(cond, "reward", None) is None:
            return text_fn
        if not np.isfinite(reward_guidance) or reward_guidance < 0:
            raise ValueError(f"reward_guidance={reward_guidance!r}: give a finite number >= 0 (1 is the paper's "
                             "sampler, 0 samples with the reward unknown).")
        cond_fn = self.velocity_fn(cond, model)
        unknown_fn = self.velocity_fn(self.unknown_reward(cond), model)
        w = float(reward_guidance)
        if guidance == 1.0:  # text_fn is cond_fn: one call less
            return lambda x, t: cfg_velocity(cond_fn, unknown_fn, x, t, w)
        return lambda x, t: text_fn(x, t) + (w - 1.0) * (cond_fn(x, t) - unknown_fn(x, t))

    def velocity_fn(self, cond: Conditioning, model=None):
        model = model or self.model
        reward = getattr(cond, "reward", None)
        if reward is None or not isinstance(model, RewardConditionedEditor):
            return super().velocity_fn(cond, model)

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            return model(x_t, t, cond.text_states, cond.pooled, source_latents=cond.source_latents,
                         extra_time_embedding=cond.extra_time_embedding, reward=reward)

        return fn

    @torch.no_grad()
    def edit(self, sources: np.ndarray | Tensor, instructions: Sequence[str], steps: int = 4, seed: int = 0,
             guidance: float = 1.0, cond: Conditioning | None = None, scores=BEST_SCORES,
             failure_texts=BEST_TEXT, reward_guidance: float = 1.0) -> np.ndarray:
        """Edit with the requested reward: default (5, 5, 5) and "None; None; None";
        ``reward_guidance`` > 1 guides towards it (see the module's docstring)."""
        src = check_image_tensor(sources, "sources") if isinstance(sources, Tensor) else to_tensor(sources)
        if cond is None:
            cond = self.condition(instructions, src, scores=scores, failure_texts=failure_texts)
        return self.sample(self.guided_velocity_fn(cond, guidance, reward_guidance=reward_guidance), src.shape[0],
                           src.shape[-1], steps, seed)
