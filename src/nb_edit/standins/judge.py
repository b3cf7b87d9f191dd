"""Pretraining the tiny VLM judge (a real ``LlavaForConditionalGeneration``) on ShapesWorld.

Trained in stages, as LLaVA is, because a tiny VLM trained from scratch on yes/no questions
learns nothing in CPU minutes:

1. **perception** - the CLIP vision tower alone, with throw-away linear heads, learns per
   patch the colour, shape and texture of the object covering it, and per image the
   background and style (cross-entropy). Its patch features then say *what is where*.
2. **alignment** - the projector and the language model learn to *say* what the images show:
   the caption of an image, and the instruction that turns image 1 into image 2 (LLaVA's first
   stage: every answer token is a target, far more signal per example than one yes/no).
3. **questions** - the whole model answers the judge's questions (:mod:`nb_edit.models.vlm.questions`)
   about oracle-labelled examples (:mod:`nb_edit.data.judge_qa`): NP-Edit's edit-verification
   and identity questions on correct, unchanged, wrong, partial, collateral, blurred and
   blended outputs, the remove variant, single-image presence questions and the 0-5 quality
   score. Loss: cross-entropy of the answer token at the answer position; the vision tower
   learns at a tenth of the rate. One answer token is little signal per example, so two
   dense auxiliary targets ride along on the language model's last hidden states at the
   tokens of image 2 (a throw-away linear head, as in stage 1): per patch, *did it change
   from image 1?*, the comparison "was the rest preserved?" is built on. A quarter-size batch
   of stage-2 examples keeps the model able to describe what it sees.
4. **feedback** - the same loss on a second pool that holds every question the methods ask:
   half of the edit questions become score questions (Multi-Reward's following and
   preserving scores on 0-5, MT-EditFlow's IF and CC on 1-5, also CC over multi-turn chains),
   labelled with the oracle's graded score; and a share of the outputs are the shipped
   supervised editors' own 4-step edits of unseen scenes (the hard negatives a judge meets
   when it rewards a generator). Needs those editors (``make pretrain`` builds them first).
   The learning rate anneals to 0 over this stage (cosine).
5. **hard outputs** - the same loss on fresh yes/no questions whose candidate outputs lean to
   the kinds the judge gets wrong most (wrong edits, patchy and blended outputs, noise and
   blur: :data:`HARD_WEIGHTS`), with stage 4's pool mixed in so that the score questions and
   the editors' own outputs are not forgotten; at a fraction of stage 3's learning rate,
   annealed (cosine). After stage 4 a yes/no answer is right on 0.97-0.99 of clean outputs and
   0.69-0.85 of degraded ones; neither a larger model nor longer or annealed schedules moved
   "was the instruction followed?" past 0.89, while a stage on these outputs did.

The examples are generated once into a pool (the artifact cache) and reused every epoch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from nb_edit import world
from nb_edit.core import cache
from nb_edit.core.config import StageConfig
from nb_edit.core.images import to_tensor
from nb_edit.data import judge_qa
from nb_edit.evaluation.harness import run_editor
from nb_edit.flow.pipeline import load_pipeline
from nb_edit.models.text import build_tokenizer
from nb_edit.models.vlm import questions
from nb_edit.models.vlm.judge import TEMPLATE_WORDS, VLMJudge, _right_pad, single_token_id
from nb_edit.rewards.formulas import expected_score
from nb_edit.training.loop import LoopConfig, train
from nb_edit.world.config import OBJECT_COLOURS

# stage 5's candidate-output weights (``judge_qa.qa_batch``'s ``kind_weights``; stages 3-4 use its
# defaults, target 3 / source 1.5 / noisy 2 / blur 1 / blend 1 / other_target 1 / patchy 1.5)
HARD_WEIGHTS = {"target": 3, "source": 1.5, "noisy": 2, "blur": 1.5, "blend": 2.5, "other_target": 3, "patchy": 3}


@dataclasses.dataclass
class JudgeConfig(StageConfig):
    family: str = "llava"
    patch_size: int = 8  # 32 px / 8 = 16 tokens per image
    vision_layers: int = 3
    text_layers: int = 3
    hidden: int = 96
    perception_steps: int = 300
    align_steps: int = 500
    qa_steps: int = 5000
    qa_decay_steps: int = 0  # > 0: stage 3 anneals qa_lr linearly to 0 over its last steps ("wsd")
    batch_size: int = 64
    lr: float = 1e-3
    qa_lr: float = 5e-4
    vision_lr_scale: float = 0.1
    aux_weight: float = 1.0  # dense per-patch "changed" target in stage 3
    align_mix: float = 0.5  # weight of the stage-2 loss kept in stage 3
    pool_size: int = 20000
    eval_size: int = 1000
    presence_share: float = 0.15  # share of single-image presence questions
    feedback_steps: int = 3000  # stage 4: score questions and the editors' own outputs
    feedback_schedule: str = "cosine"  # stage 4 anneals the learning rate to 0
    feedback_lr_scale: float = 1.0  # stage 4's lr = qa_lr * this
    feedback_pool: int = 20000
    score_share: float = 0.5  # share of stage-4 edit questions that ask for a score
    chain_share: float = 0.1  # share of stage-4 examples that are multi-turn CC questions
    editor_share: float = 0.35  # share of stage-4 examples whose output a shipped editor drew
    editors: tuple = ("clean", "noisy")
    hard_steps: int = 4500  # stage 5: hard candidate outputs with stage 4's pool mixed in (0 = no stage 5)
    hard_pool: int = 40000  # fresh questions on hard outputs; stage 4's pool is added to them
    hard_lr_scale: float = 0.3  # stage 5's lr = qa_lr * this, annealed to 0 (cosine)
    hard_weights: dict = dataclasses.field(default_factory=lambda: dict(HARD_WEIGHTS))
    num_threads: int = 2
    world: dict = dataclasses.field(default_factory=lambda: world.WorldConfig().to_dict())

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {},
        "smoke": dict(perception_steps=2, align_steps=2, qa_steps=2, batch_size=4, pool_size=16, eval_size=16,
                      vision_layers=2, text_layers=2, num_threads=1, feedback_steps=2, feedback_pool=24,
                      hard_steps=2, hard_pool=16),
    }


def judge_tokenizer(world_cfg: world.WorldConfig):
    texts = [" ".join(world.vocabulary(world_cfg)), " ".join(questions.template_words()), " ".join(TEMPLATE_WORDS),
             questions.DESCRIBE, questions.WHAT_CHANGED]
    return build_tokenizer(texts, model_max_length=256)


def build_pool(cfg: JudgeConfig, n: int, seed: int) -> cache.Artifact:
    """``n`` oracle-labelled QA examples (uint8 images, questions, answers), cached."""
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    key = {"what": "judge_qa_pool", "n": n, "seed": seed, "world": cfg.world, "presence": cfg.presence_share,
           "version": 3}

    def build():
        rng = np.random.default_rng(seed)
        return _pool_content(judge_qa.qa_batch(world_cfg, rng, n, edit_share=1.0 - cfg.presence_share))

    return cache.ensure("judge_qa_pool", key, build)


def _pool_content(examples, **extra_meta) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """A pool artifact's (tensors, meta): the image stacks, then question, answer and kind columns."""
    tensors = {"source": torch.from_numpy(np.stack([e.source for e in examples])),
               "output": torch.from_numpy(np.stack([e.output for e in examples]))}
    meta = {"question": [e.question for e in examples], "answer": [e.answer for e in examples],
            "kind": [e.kind for e in examples], **extra_meta}
    return tensors, meta


def build_hard_pool(cfg: JudgeConfig, n: int, seed: int) -> cache.Artifact:
    """Stage 5's ``n`` fresh questions (stage 3's mix: followed, preserved, quality, presence)
    whose candidate outputs are drawn with ``cfg.hard_weights``, cached."""
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    key = {"what": "judge_hard_pool", "n": n, "seed": seed, "world": cfg.world, "presence": cfg.presence_share,
           "weights": cfg.hard_weights, "version": 1}

    def build():
        rng = np.random.default_rng([seed, 5])  # a stream of its own: no question shared with stages 3-4
        return _pool_content(judge_qa.qa_batch(world_cfg, rng, n, edit_share=1.0 - cfg.presence_share,
                                               kind_weights=cfg.hard_weights))

    return cache.ensure("judge_hard_pool", key, build)


def concat_pools(*pools) -> SimpleNamespace:
    """One pool (``.tensors``, ``.meta``) of several, row after row; a pool without an ``origin``
    column contributes "synthetic" rows."""
    tensors = {k: torch.cat([p.tensors[k] for p in pools]) for k in ("source", "output")}
    meta = {k: sum((list(p.meta[k]) for p in pools), []) for k in ("question", "answer", "kind")}
    meta["origin"] = sum((list(p.meta.get("origin", ["synthetic"] * len(p.meta["question"]))) for p in pools), [])
    return SimpleNamespace(tensors=tensors, meta=meta)


def _editor_fingerprint(editors_root: Path, names) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        digest.update((editors_root / name / "made_by.json").read_bytes())
    return digest.hexdigest()[:16]


def build_feedback_pool(cfg: JudgeConfig, n: int, seed: int, editors_root: Path | None) -> cache.Artifact:
    """Stage 4's ``n`` examples: synthetic outputs with score and chain questions, plus
    (share ``editor_share``) the shipped editors' 4-step edits of fresh scenes, every label from
    the oracle. Cached under the editors' fingerprint."""
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    use_editors = cfg.editor_share > 0 and editors_root is not None
    if use_editors:
        missing = [e for e in cfg.editors if not (editors_root / e / "made_by.json").exists()]
        if missing:
            raise FileNotFoundError(f"the judge's feedback stage draws hard negatives from the editors {missing}, "
                                    f"which are not made in {editors_root}; run `make pretrain` (it builds them first) "
                                    "or set editor_share=0.")
    n_editor = int(round(n * cfg.editor_share)) if use_editors else 0
    key = {"what": "judge_feedback_pool", "n": n, "seed": seed, "world": cfg.world, "score_share": cfg.score_share,
           "chain_share": cfg.chain_share, "editor_share": cfg.editor_share if use_editors else 0,
           "editors": _editor_fingerprint(editors_root, cfg.editors) if use_editors else None, "version": 1}

    def build():

        rng = np.random.default_rng([seed, 4])
        examples = judge_qa.qa_batch(world_cfg, rng, n - n_editor, edit_share=1.0 - cfg.presence_share,
                                     score_share=cfg.score_share, chain_share=cfg.chain_share)
        origin = ["synthetic"] * len(examples)
        for i, name in enumerate(cfg.editors if n_editor else ()):
            count = n_editor // len(cfg.editors) + (i < n_editor % len(cfg.editors))
            edits = [judge_qa.random_edit(world.sample_scene(rng, world_cfg), rng, world_cfg) for _ in range(count)]
            sources = np.stack([world.render(e.source, world_cfg) for e in edits])
            outputs = run_editor(load_pipeline(editors_root / name), sources, [e.instruction for e in edits],
                                 steps=4, seed=seed + 1000 * i, desc=f"judge pool: {name} editor")
            examples += [judge_qa.pick_example(e, o, world_cfg, rng, cfg.score_share) for e, o in zip(edits, outputs)]
            origin += ["editor"] * count
        return _pool_content(examples, origin=origin)

    return cache.ensure("judge_feedback_pool", key, build)


def _perception_batch(cfg: JudgeConfig, step: int, patch: int):
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    rng = np.random.default_rng([cfg.seed, step, 7])
    scenes = []
    for _ in range(cfg.batch_size):
        scene = world.sample_scene(rng, world_cfg)
        if rng.random() < 0.5:
            scene = judge_qa.random_edit(scene, rng, world_cfg).target
        scenes.append(scene)
    images = np.stack([world.render(s, world_cfg) for s in scenes])
    labels = [judge_qa.perception_targets(s, world_cfg, patch) for s in scenes]
    stacked = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in labels[0]}
    return to_tensor(images), stacked


class PerceptionHeads(torch.nn.Module):
    """Linear read-outs of the vision tower's patch features (discarded after stage 1)."""

    def __init__(self, hidden: int, cfg: world.WorldConfig):
        super().__init__()

        self.colour = torch.nn.Linear(hidden, 1 + len(OBJECT_COLOURS))
        self.shape = torch.nn.Linear(hidden, 1 + len(cfg.shapes))
        self.texture = torch.nn.Linear(hidden, 1 + len(cfg.textures))
        self.background = torch.nn.Linear(hidden, len(cfg.backgrounds))
        self.style = torch.nn.Linear(hidden, len(cfg.styles))


def _patch_features(judge: VLMJudge, images: torch.Tensor) -> torch.Tensor:
    """The features LLaVA feeds its projector: hidden states of ``vision_feature_layer``, CLS dropped."""
    tower = judge.model.model.vision_tower
    layer = judge.model.config.vision_feature_layer
    out = tower(judge.preprocess(images), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def train_perception(judge: VLMJudge, cfg: JudgeConfig, ckpt_dir: Path) -> list[dict]:
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    patch = judge.model.config.vision_config.patch_size
    grid = world_cfg.resolution // patch
    heads = PerceptionHeads(judge.model.config.vision_config.hidden_size, world_cfg)
    tower = judge.model.model.vision_tower

    def step_fn(batch, step):
        images, labels = batch
        feats = _patch_features(judge, images)  # (B, grid*grid, D)
        pooled = feats.mean(dim=1)
        losses = {name: F.cross_entropy(getattr(heads, name)(feats).flatten(0, 1), labels[name].flatten())
                  for name in ("colour", "shape", "texture")}
        losses["background"] = F.cross_entropy(heads.background(pooled), labels["background"])
        losses["style"] = F.cross_entropy(heads.style(pooled), labels["style"])
        assert feats.shape[1] == grid * grid
        return {"loss": sum(losses.values()), **losses}

    loop = LoopConfig(steps=cfg.perception_steps, lr=cfg.lr, optimizer="adamw", grad_clip=1.0,
                      checkpoint_every=200, seed=cfg.seed)
    return list(train(step_fn, {"vision_tower": tower, "heads": heads}, config=loop, ckpt_dir=ckpt_dir,
                      batch_fn=lambda step: _perception_batch(cfg, step, patch), run_config=cfg.to_dict()))


def _alignment_batch(cfg: JudgeConfig, step: int):
    """Half captions of one image, half instructions between a source and its edit's target."""
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    rng = np.random.default_rng([cfg.seed, step, 8])
    sources, outputs, prompts, answers = [], [], [], []
    for _ in range(cfg.batch_size):
        edit = judge_qa.random_edit(world.sample_scene(rng, world_cfg), rng, world_cfg)
        source, target = world.render(edit.source, world_cfg), world.render(edit.target, world_cfg)
        if rng.random() < 0.5:
            sources.append(target), outputs.append(target), prompts.append(questions.DESCRIBE)
            answers.append(edit.caption_edited)
        else:
            sources.append(source), outputs.append(target), prompts.append(questions.WHAT_CHANGED)
            answers.append(edit.instruction)
    return to_tensor(np.stack(sources)), to_tensor(np.stack(outputs)), prompts, answers


def sequence_loss(judge: VLMJudge, images: list[torch.Tensor], prompts: list[str], answers: list[str]) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy on the answer tokens (and the end token) only."""
    vision, counts, _ = judge._vision_inputs(images)
    rows, targets = [], []
    for prompt, answer in zip(prompts, answers):
        ids, _ = judge.prompt_ids(prompt, counts)
        answer_ids_ = judge.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [judge.tokenizer.eos_token_id]
        rows.append(ids + answer_ids_)
        targets.append([-100] * (len(ids) - 1) + answer_ids_ + [-100])
    width = max(map(len, rows))
    pad = judge.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=judge.device)
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets], device=judge.device)
    hidden = judge._base_forward(ids, vision).last_hidden_state
    logits = judge.model.get_output_embeddings()(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def train_alignment(judge: VLMJudge, cfg: JudgeConfig, ckpt_dir: Path) -> list[dict]:
    """Stage 2: captions and instructions as dense targets; the vision tower stays frozen."""
    tower = judge.model.model.vision_tower
    tower.requires_grad_(False)

    def step_fn(batch, step):
        sources, outputs, prompts, answers = batch
        return {"loss": sequence_loss(judge, [sources, outputs], prompts, answers)}

    loop = LoopConfig(steps=cfg.align_steps, lr=cfg.lr, optimizer="adamw", grad_clip=1.0, warmup_steps=50,
                      checkpoint_every=200, seed=cfg.seed)
    history = train(step_fn, {"judge": judge.model}, config=loop, ckpt_dir=ckpt_dir,
                    batch_fn=lambda step: _alignment_batch(cfg, step), run_config=cfg.to_dict())
    tower.requires_grad_(True)
    return list(history)


def answer_ids(judge: VLMJudge, answers: list[str]) -> torch.Tensor:

    table = {a: single_token_id(judge.tokenizer, a) for a in set(answers)}
    return torch.tensor([table[a] for a in answers])


def qa_logits(judge: VLMJudge, source: torch.Tensor, output: torch.Tensor, qs: list[str]) -> torch.Tensor:
    """Answer-position logits ``(B, V)`` for (source, output) uint8 pairs."""
    images = [to_tensor(source.numpy()), to_tensor(output.numpy())]
    return judge.answer_logits(images, qs)[:, 0]


def dense_targets(pool: cache.Artifact, patch: int) -> torch.Tensor:
    """``(N, tokens, 1)`` per-patch labels of image 2: did the patch change from image 1?"""
    source, output = pool.tensors["source"].numpy(), pool.tensors["output"].numpy()
    changed = judge_qa.patch_share(judge_qa.changed_pixels(source, output), patch)
    return torch.from_numpy(changed[..., None]).float()


def qa_forward(judge: VLMJudge, source: torch.Tensor, output: torch.Tensor, qs: list[str]):
    """Answer-position logits ``(B, V)`` and the last hidden states at image 2's tokens ``(B, T, D)``."""

    vision, counts, _ = judge._vision_inputs([to_tensor(source.numpy()), to_tensor(output.numpy())])
    ids, lengths = _right_pad([judge.prompt_ids(q, counts)[0] for q in qs], judge.pad_id, judge.device)
    hidden = judge._base_forward(ids, vision).last_hidden_state
    image_pos = (ids == judge.image_token_id).nonzero()[:, 1].view(len(qs), -1)[:, counts[0]:]
    rows = torch.arange(len(qs), device=hidden.device)[:, None]
    return judge._logits_at(hidden, lengths).float(), hidden[rows, image_pos]


def train_questions(judge: VLMJudge, cfg: JudgeConfig, pool: cache.Artifact, ckpt_dir: Path,
                    steps: int | None = None, schedule: str | None = None, lr_scale: float = 1.0) -> list[dict]:
    """Stages 3, 4 and 5: answer-token cross-entropy on ``pool``. Stage 3 (the defaults): ``cfg.qa_steps``
    at ``qa_lr``, annealed over the last ``cfg.qa_decay_steps`` when that is > 0 ("wsd", which a
    finished constant-lr stage 3 extends by resuming)."""
    n = pool.tensors["source"].shape[0]
    qs, answers = pool.meta["question"], pool.meta["answer"]
    targets = answer_ids(judge, answers)
    dense = dense_targets(pool, judge.model.config.vision_config.patch_size)
    heads = torch.nn.Linear(judge.model.config.text_config.hidden_size, dense.shape[-1])  # discarded after training
    vision = [p for n_, p in judge.model.named_parameters() if "vision_tower" in n_]
    rest = [p for n_, p in judge.model.named_parameters() if "vision_tower" not in n_] + list(heads.parameters())
    lr = cfg.qa_lr * lr_scale
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": vision, "lr": lr * cfg.vision_lr_scale}], lr=lr)
    align_cfg = dataclasses.replace(cfg, batch_size=max(1, cfg.batch_size // 4), seed=cfg.seed + 1)

    def batch_fn(step):
        epoch, offset = divmod(step * cfg.batch_size, n)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        idx = np.concatenate([order, np.random.default_rng([cfg.seed, epoch + 1]).permutation(n)])
        return idx[offset: offset + cfg.batch_size], _alignment_batch(align_cfg, step)

    def step_fn(batch, step):
        idx, align = batch
        logits, image2 = qa_forward(judge, pool.tensors["source"][idx], pool.tensors["output"][idx], [qs[i] for i in idx])
        target = targets[idx]
        answer = F.cross_entropy(logits, target)
        aux = F.binary_cross_entropy_with_logits(heads(image2).float(), dense[idx])
        describe = sequence_loss(judge, [align[0], align[1]], align[2], align[3])
        loss = answer + cfg.aux_weight * aux + cfg.align_mix * describe
        return {"loss": loss, "answer_loss": answer, "aux_loss": aux, "describe_loss": describe,
                "acc": (logits.argmax(-1) == target).float().mean()}

    steps = cfg.qa_steps if steps is None else steps
    schedule = schedule or ("wsd" if cfg.qa_decay_steps else "constant")
    loop = LoopConfig(steps=steps, lr=lr, optimizer="adamw", grad_clip=1.0, warmup_steps=50,
                      checkpoint_every=250, seed=cfg.seed, schedule=schedule,
                      decay_steps=min(cfg.qa_decay_steps, steps) if schedule == "wsd" else 0)
    return list(train(step_fn, {"judge": judge.model, "heads": heads}, config=loop, ckpt_dir=ckpt_dir,
                      batch_fn=batch_fn, optimizers={"main": optimizer}, run_config=cfg.to_dict()))


@torch.no_grad()
def evaluate_pool(judge: VLMJudge, pool: cache.Artifact, batch: int = 128) -> dict[str, float]:
    """Accuracy per question kind on a held-out pool (answer = argmax over the vocabulary).

    Score questions also get ``spearman_<kind>``: the rank correlation of the judge's expected
    score (``rewards.formulas.expected_score`` over the digits of that question's range,
    ``judge_qa.SCORE_RANGES``, as the rewards read it) with the oracle's label. A pool with an
    ``origin`` column adds ``acc_editor_<kind>`` on the editors' outputs alone.
    """
    from scipy.stats import spearmanr

    qs, answers, kinds = pool.meta["question"], pool.meta["answer"], pool.meta["kind"]
    origin = pool.meta.get("origin", ["synthetic"] * len(qs))
    targets = answer_ids(judge, answers)
    top = max(hi for _, hi in judge_qa.SCORE_RANGES.values())
    digit_ids = [single_token_id(judge.tokenizer, str(d)) for d in range(top + 1)]
    correct, digit_rows = [], []
    for start in range(0, len(qs), batch):
        idx = np.arange(start, min(start + batch, len(qs)))
        logits = qa_logits(judge, pool.tensors["source"][idx], pool.tensors["output"][idx], [qs[i] for i in idx])
        correct += (logits.argmax(-1) == targets[idx]).tolist()
        digit_rows.append(logits[:, digit_ids])  # the digit columns are all the scores read
    digit_logits = torch.cat(digit_rows)
    result = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        result[f"acc_{kind}"] = float(np.mean([correct[i] for i in rows]))
        if kind in judge_qa.SCORE_RANGES:
            labels = [float(answers[i]) for i in rows]
            lo, hi = judge_qa.SCORE_RANGES[kind]
            digits = list(range(lo, hi + 1))
            expected = expected_score(digit_logits[rows][:, lo:hi + 1], digits).tolist()
            if len(set(labels)) > 1:
                result[f"spearman_{kind}"] = float(spearmanr(expected, labels).statistic)
        editor_rows = [i for i in rows if origin[i] == "editor"]
        if editor_rows and len(editor_rows) < len(rows):
            result[f"acc_editor_{kind}"] = float(np.mean([correct[i] for i in editor_rows]))
    return result


def train_judge(cfg: JudgeConfig, out_dir: Path, ckpt_dir: Path, editors_root: Path | None = None) -> dict[str, Any]:
    """All five stages (``cfg.hard_steps=0`` stops after four); ``editors_root`` holds the supervised
    editors stage 4 draws outputs from."""
    start = time.perf_counter()
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    sizes = dict(vision_layers=cfg.vision_layers, text_layers=cfg.text_layers, hidden=cfg.hidden)
    if cfg.family == "llava":
        sizes["patch_size"] = cfg.patch_size
    judge = VLMJudge.tiny(cfg.family, judge_tokenizer(world_cfg), image_size=world_cfg.resolution, seed=cfg.seed, **sizes)
    judge.model.train()
    perception = train_perception(judge, cfg, ckpt_dir / "perception")
    alignment = train_alignment(judge, cfg, ckpt_dir / "alignment")
    pool = build_pool(cfg, cfg.pool_size, seed=cfg.seed)
    questions_history = train_questions(judge, cfg, pool, ckpt_dir / "questions")
    feedback = build_feedback_pool(cfg, cfg.feedback_pool, seed=cfg.seed, editors_root=editors_root)
    history = train_questions(judge, cfg, feedback, ckpt_dir / "feedback", steps=cfg.feedback_steps,
                              schedule=cfg.feedback_schedule, lr_scale=cfg.feedback_lr_scale)
    hard_history = []
    if cfg.hard_steps:
        hard = concat_pools(build_hard_pool(cfg, cfg.hard_pool, seed=cfg.seed), feedback)
        hard_history = train_questions(judge, cfg, hard, ckpt_dir / "hard", steps=cfg.hard_steps,
                                       schedule="cosine", lr_scale=cfg.hard_lr_scale)
    judge.model.eval()
    held_out = evaluate_pool(judge, build_pool(cfg, cfg.eval_size, seed=cfg.seed + 10_000))
    held_out_feedback = evaluate_pool(judge, build_feedback_pool(cfg, cfg.eval_size, seed=cfg.seed + 10_000,
                                                                 editors_root=editors_root))
    judge.save_pretrained(out_dir)
    losses = [h["answer_loss"] for h in hard_history or history]
    return {"steps": len(perception) + len(alignment) + len(questions_history) + len(history) + len(hard_history),
            "questions_final_loss": float(np.mean([h["answer_loss"] for h in questions_history[-50:]])),
            "feedback_final_loss": float(np.mean([h["answer_loss"] for h in history[-50:]])),
            **{f"held_out_feedback_{k}": v for k, v in held_out_feedback.items()},
            "final_loss": float(np.mean(losses[-50:])),
            "perception_final_loss": float(np.mean([h["loss"] for h in perception[-20:]])),
            "alignment_final_loss": float(np.mean([h["loss"] for h in alignment[-20:]])),
            "wall_s": time.perf_counter() - start, "loss_curve": losses[:: max(1, len(losses) // 200)],
            **{f"held_out_{k}": v for k, v in held_out.items()}}
