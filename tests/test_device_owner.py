"""One owner of device, mixed precision and processes: accelerate (``core.runtime``, ``training.loop``).

Every trainer builds every module it holds on the accelerator's device and trains there; a bf16
config on a machine without CUDA trains in fp32 with one warning naming the field; quantisation
without CUDA is refused with the fix before anything loads; an empty model id is the profile's
model; settings added to the configs leave earlier runs' cache keys and checkpoints valid;
gradient accumulation equals one step on the whole batch. Smoke sizes, 1-2 steps each.
"""

import inspect
import re
import warnings

import pytest
import torch

from nb_edit.core import runtime
from nb_edit.core.config import parse_overrides
from nb_edit.core.runtime import CPUFallbackWarning, placement
from nb_edit.core.validation import BadInputError
from nb_edit.methods import registry
from nb_edit.methods.mtrl import train as mtrl_train
from nb_edit.methods.mtrl.train import MTRLConfig, MTRLTrainer
from nb_edit.methods.multireward import train as multireward_train
from nb_edit.methods.multireward.train import MultiRewardConfig, MultiRewardTrainer
from nb_edit.methods.npedit import train as npedit_train
from nb_edit.methods.npedit.train import NPEditConfig, NPEditTrainer
from nb_edit.training import loop
from nb_edit.training.loop import LoopConfig, make_accelerator, train

ON_CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not ON_CPU, reason="the CPU fallbacks only apply where there is no CUDA device")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared machine: one thread avoids oversubscribing its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def annotated(smoke_data, tmp_path_factory):
    """Four noisy triplets annotated by a randomly initialised tiny judge (Multi-Reward's input)."""
    from nb_edit import world
    from nb_edit.models.vlm.judge import VLMJudge
    from nb_edit.rewards.single_turn import JudgeReward, annotate_rewards
    from nb_edit.standins.judge import judge_tokenizer

    judge = VLMJudge.tiny("llava", judge_tokenizer(world.WorldConfig()), image_size=32, vision_layers=1,
                          text_layers=1).freeze()
    return annotate_rewards(smoke_data["noisy"].split("train")[:4], JudgeReward(judge),
                            tmp_path_factory.mktemp("rewardedit"))


def _modules(obj, depth: int = 3, seen: set | None = None) -> list[torch.nn.Module]:
    """Every torch module ``obj`` holds: its attributes, their attributes (pipelines, rewards,
    judges), ``depth`` levels down."""
    seen = set() if seen is None else seen
    found = []
    for value in vars(obj).values():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif depth > 1 and hasattr(value, "__dict__") and type(value).__module__.startswith("nb_edit"):
            found += _modules(value, depth - 1, seen)
    return found


def _devices(modules) -> set[str]:
    return {str(t.device) for m in modules for t in [*m.parameters(), *m.buffers()]}


def _npedit(standins, data):
    cfg = NPEditConfig.for_profile("smoke", teacher_id=str(standins / "teacher"), judge_id=str(standins / "judge"),
                                   steps=1, copy_warmup_steps=0, curve_every=0, gradient_checkpointing=True)
    return NPEditTrainer(cfg, data["unpaired"])


def _multireward(standins, annotated):
    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(standins / "noisy"), steps=1,
                                        gradient_checkpointing=True)
    return MultiRewardTrainer(cfg, annotated)


def _mtrl(standins, data):
    cfg = MTRLConfig.for_profile("smoke", policy_id=str(standins / "clean"), judge_id=str(standins / "judge"),
                                 steps=1, n_turns=1, track_oracle=False, gradient_checkpointing=True)
    return MTRLTrainer(cfg, data["multiturn"])


@pytest.mark.parametrize("stage", ["npedit", "multireward", "mtrl"])
def test_every_trainer_keeps_every_module_on_the_accelerators_device(stage, smoke_standins, smoke_data, annotated,
                                                                     tmp_path):
    trainer = {"npedit": lambda: _npedit(smoke_standins, smoke_data),
               "multireward": lambda: _multireward(smoke_standins, annotated),
               "mtrl": lambda: _mtrl(smoke_standins, smoke_data)}[stage]()
    accelerator = make_accelerator()
    assert runtime.same_device(trainer.device, accelerator.device)
    # the editor (its teacher, fake score or reference policy are the same base with adapters
    # off or switched), the text encoder, the autoencoder and the judge are all found
    expected = [trainer.model, trainer.pipe.text_encoder, trainer.pipe.autoencoder]
    expected += {"npedit": lambda: [trainer.judge.model], "multireward": lambda: [trainer.editor],
                 "mtrl": lambda: [trainer.reward.judge.model]}[stage]()
    modules = _modules(trainer)
    assert all(any(m is e for m in modules) for e in expected)
    history = trainer.fit(tmp_path / "ckpt", progress=False)
    assert len(history) == 1 and history[-1]["skipped"] == 0
    assert (trainer.editor if stage == "multireward" else trainer.model).backbone.is_gradient_checkpointing
    after = _modules(trainer)
    devices = _devices(after)
    assert devices and all(runtime.same_device(d, accelerator.device) for d in devices), devices
    assert not any(p.requires_grad and p.dtype != torch.float32 for m in after for p in m.parameters())


def test_a_trainer_on_another_device_than_the_accelerators_refuses_to_train(smoke_standins, annotated, tmp_path,
                                                                            monkeypatch):
    """The accelerator's device decides; a trainer built elsewhere is refused before a step."""
    trainer = _multireward(smoke_standins, annotated)

    class OtherDevice:  # the accelerator's state as it would be on a GPU machine
        device = torch.device("cuda", 0) if ON_CPU else torch.device("cpu")

    monkeypatch.setattr(loop, "process_state", lambda: OtherDevice())
    with pytest.raises(BadInputError, match=r"device=None") as caught:
        trainer.fit(tmp_path / "ckpt", progress=False)
    assert str(OtherDevice.device) in str(caught.value)
    assert not (tmp_path / "ckpt").exists()


def test_no_trainer_names_a_device_itself():
    """The trainers take their device from the accelerator: no literal "cpu" (or "cuda") default."""
    for module in (npedit_train, multireward_train, mtrl_train, registry):
        source = inspect.getsource(module)
        assert not re.search(r"""["'](cpu|cuda)(:\d+)?["']""", source), module.__name__


@cpu_only
def test_bf16_config_on_cpu_trains_in_fp32_with_one_warning_per_field(smoke_standins, annotated, tmp_path):
    cfg = MultiRewardConfig.for_profile("smoke", editor_id=str(smoke_standins / "noisy"), steps=1,
                                        mixed_precision="bf16", dtype="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = MultiRewardTrainer(cfg, annotated)
        history = trainer.fit(tmp_path / "ckpt", progress=False)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, CPUFallbackWarning)]
    assert len(fallbacks) == 2, fallbacks
    assert any("MultiRewardConfig.mixed_precision='bf16'" in m for m in fallbacks)
    assert any("MultiRewardConfig.dtype='bf16'" in m for m in fallbacks)
    assert trainer.placement.mixed_precision == "no" and trainer.placement.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert len(history) == 1 and history[0]["skipped"] == 0
    # the loop itself, given bf16 directly, says what to do instead
    with pytest.raises(BadInputError, match="mixed_precision='no' on CPU"):
        train(lambda b, s: {"loss": torch.zeros(())}, {"net": torch.nn.Linear(2, 2)},
              config=LoopConfig(mixed_precision="bf16"), ckpt_dir=tmp_path / "loop", batch_fn=lambda s: None,
              progress=False)


@cpu_only
@pytest.mark.parametrize("cls", [NPEditConfig, MultiRewardConfig, MTRLConfig])
def test_the_full_profile_on_cpu_refuses_quantisation_and_falls_back_to_fp32_without_it(cls):
    with warnings.catch_warnings(), pytest.raises(BadInputError, match="needs a CUDA device") as caught:
        warnings.simplefilter("error")  # the refusal comes first, not after a fallback warning
        placement(cls.for_profile("full", quantization="nf4"))
    assert f"{cls.__name__}.quantization='nf4'" in str(caught.value) and "quantization=null" in str(caught.value)
    with pytest.warns(CPUFallbackWarning, match=f"{cls.__name__}.mixed_precision='bf16'"):
        # replace: for_profile reads an override of None as "the profile's value" (as --set x=null does)
        place = placement(cls.for_profile("full").replace(quantization=None))
    assert (place.device.type, place.dtype, place.mixed_precision, place.quantization) == \
        ("cpu", torch.float32, "no", None)


@cpu_only
@pytest.mark.bad_input
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantisation_on_cpu_is_refused_before_any_model_loads(quantization, annotated, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded although the quantisation cannot work here")

    monkeypatch.setattr(multireward_train, "load_editor", loaded)
    cfg = MultiRewardConfig.for_profile("smoke", quantization=quantization)
    with pytest.raises(BadInputError, match="needs a CUDA device") as caught:
        MultiRewardTrainer(cfg, annotated)
    assert "Fix:" in str(caught.value) and "quantization=None" in str(caught.value)


@pytest.mark.bad_input
def test_unknown_placement_settings_and_impossible_combinations_are_refused():
    with pytest.raises(BadInputError, match="unknown dtype"):
        NPEditConfig.for_profile("smoke", dtype="float8")
    with pytest.raises(BadInputError, match="unknown quantization"):
        MTRLConfig.for_profile("smoke", quantization="4bit")
    with pytest.raises(BadInputError, match="quantised weights cannot train"):
        MultiRewardConfig.for_profile("smoke", lora_rank=0, quantization="nf4")
    with pytest.raises(BadInputError, match="gradient_accumulation_steps"):
        parse_overrides(MultiRewardConfig, ["gradient_accumulation_steps=0"])


def test_an_empty_model_id_means_the_profiles_model():
    """notebook 06's editor_id="" must not swap the full profile's InstructPix2Pix for the stand-in."""
    assert MultiRewardConfig.for_profile("full", editor_id="").editor_id == "timbrooks/instruct-pix2pix"
    assert MultiRewardConfig.for_profile("tiny", editor_id="").editor_id == ""  # the tiny profile's: the stand-in
    assert MultiRewardConfig.for_profile("full", editor_id="me/editor").editor_id == "me/editor"
    full = NPEditConfig.for_profile("full", teacher_id="", judge_id="")
    assert (full.teacher_id, full.judge_id) == ("black-forest-labs/FLUX.1-Kontext-dev", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert MTRLConfig.for_profile("full", policy_id="").policy_id == "black-forest-labs/FLUX.1-Kontext-dev"
    # the notebooks' way (registry) and the command line's way (--set editor_id=) agree
    assert {c.editor_id for c in registry.multireward_configs("full", editor_id="").values()} == \
        {"timbrooks/instruct-pix2pix"}
    assert MultiRewardConfig.for_profile("full", **parse_overrides(MultiRewardConfig, ["editor_id="])).editor_id == \
        "timbrooks/instruct-pix2pix"
    with pytest.raises(ValueError, match="variant"):  # only model ids: another empty setting stays empty
        MultiRewardConfig.for_profile("full", variant="")


def test_new_settings_leave_earlier_runs_found_and_resumable(tmp_path):
    """A run trained before dtype/quantization/world existed: same cache key, and its checkpoint resumes."""
    cfg = NPEditConfig.for_profile("smoke")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "quantization", "world")}
    assert cfg.identity() == old
    assert "dtype" in cfg.replace(dtype="bf16").identity()  # away from the old value it counts
    assert "world" in cfg.replace(world={**cfg.world, "max_objects": 2}).identity()
    mr = MultiRewardConfig.for_profile("smoke")
    assert set(mr.to_dict()) - set(mr.identity()) == {"dtype", "quantization", "gradient_checkpointing",
                                                      "gradient_accumulation_steps", "judge_id", "injection"}
    from nb_edit.methods.mtrl.train import MTRLConfig

    # DiffusionNFT's fixed normaliser is the new default: a run with the batch-wide maximum (what
    # every earlier run used) keeps its cache key; the new default is a new run
    rl = MTRLConfig.for_profile("smoke")
    assert rl.nft_r_scale == 5.0 and "nft_r_scale" in rl.identity()
    assert set(rl.to_dict()) - set(rl.replace(nft_r_scale=None).identity()) == {"dtype", "quantization",
                                                                                "nft_r_scale"}

    def run(steps, run_config):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return train(lambda b, s: {"loss": model(b).pow(2).mean()}, {"net": model},
                     config=LoopConfig(steps=steps, optimizer="adamw", checkpoint_every=1), ckpt_dir=tmp_path,
                     batch_fn=lambda s: torch.ones(2, 3) * s, run_config=run_config, progress=False)

    run(1, old)
    assert len(run(2, cfg.identity())) == 2  # no "config changed" refusal


def test_gradient_accumulation_equals_one_step_on_the_whole_batch(tmp_path):
    def batch(index, size):
        gen = torch.Generator().manual_seed(index)
        x = torch.randn(size, 4, generator=gen)
        return x, x.sum(1, keepdim=True)

    def run(name, k):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        whole = {i: batch(i, 8) for i in range(3)}
        # micro-batch index = step * k + i: halves of the same whole batch
        batch_fn = (lambda i: whole[i]) if k == 1 else (lambda i: tuple(t[(i % 2) * 4:(i % 2 + 1) * 4]
                                                                        for t in whole[i // 2]))
        seen = []

        def step_fn(b, index):
            seen.append(index)
            x, y = b
            return {"loss": torch.nn.functional.mse_loss(model(x), y), "index": torch.tensor(float(index))}

        config = LoopConfig(steps=3, lr=1e-2, optimizer="adamw", grad_clip=None, checkpoint_every=3,
                            gradient_accumulation_steps=k)
        history = train(step_fn, {"net": model}, config=config, ckpt_dir=tmp_path / name, batch_fn=batch_fn,
                        progress=False)
        return model, history, seen

    one, one_history, _ = run("one", 1)
    two, two_history, seen = run("two", 2)
    assert seen == list(range(6)) and len(two_history) == 3  # one record per optimizer step
    assert [r["index"] for r in two_history] == [0.5, 2.5, 4.5]  # values averaged over the micro-batches
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in one_history]),
                               torch.tensor([r["grad_norm"] for r in two_history]), rtol=1e-5, atol=1e-6)


def test_a_backbone_without_gradient_checkpointing_warns_and_trains_on():
    with pytest.warns(UserWarning, match="X.gradient_checkpointing=True but Linear"):
        assert loop.enable_gradient_checkpointing(torch.nn.Linear(2, 2), "X.gradient_checkpointing") is False


def test_each_run_gets_the_mixed_precision_it_asks_for_in_one_process():
    """accelerate keeps one mixed precision per process; the loop's accelerator starts it over
    when a run asks for another one (a notebook kernel training a bf16 stage, then an fp32 one)."""
    try:
        first = make_accelerator("bf16")  # CPU bf16 autocast exists; the stage configs never ask for it on CPU
        assert first.mixed_precision == "bf16"
        second = make_accelerator("no", gradient_accumulation_steps=3)
        assert second.mixed_precision == "no" and second.gradient_accumulation_steps == 3
        assert runtime.same_device(second.device, runtime.pick_device("auto"))
        with second.autocast():
            assert not torch.is_autocast_enabled(second.device.type)
    finally:
        make_accelerator("no")  # as every other run of the test session
