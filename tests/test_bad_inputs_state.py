"""Broken state and tensors: checkpoints and cache entries that are corrupt, made with another
configuration or cannot be written, judge folders with pickle weights, and image tensors out of
convention. Each must give a clear error naming the input and the fix, or a warning naming the
file and a recovery that loses nothing (the previous intact checkpoint, a rebuilt cache entry).
Counted by conftest.py (the ``bad_input`` marker)."""

from __future__ import annotations

import errno
import json
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nb_edit.core import cache
from nb_edit.core.images import check_image_tensor
from nb_edit.core.validation import BadInputError
from nb_edit.flow.pipeline import EditPipeline
from nb_edit.methods.npedit.train import NPEditConfig
from nb_edit.models.autoencoders import PixelAutoencoder
from nb_edit.models.editors import build_editor
from nb_edit.models.loaders import load_editor, save_components
from nb_edit.models.text import build_tiny_text_encoder, build_tokenizer
from nb_edit.models.tiny_configs import tiny_flux_config, tiny_unet_config
from nb_edit.models.vlm.judge import TEMPLATE_WORDS, VLMJudge
from nb_edit.training import checkpoint
from nb_edit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nb_edit.training.loop import LoopConfig, train

torch.set_num_threads(1)


def expect_bad(call, *args, names, fix, **kwargs) -> str:
    """The call raises BadInputError whose message names the input and says how to fix it."""
    with pytest.raises(BadInputError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    for name in names if isinstance(names, (list, tuple)) else [names]:
        assert str(name) in message, message
    assert "Fix:" in message and fix.lower() in message.split("Fix:")[1].lower(), message
    return message


def flip_byte(path, offset: int) -> None:
    """Invert one byte in place: the file keeps its size, as a bit flip on disk does."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _messages(records) -> str:
    return "\n".join(str(r.message) for r in records)


# --------------------------------------------------------------------------------- training
def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def _run(ckpt_dir, steps: int, run_config=None, seen: dict | None = None, seed: int = 0, **kwargs):
    """Train the tiny model; ``seen[step]`` gets its weights as each step starts."""
    model = _tiny(seed)

    def step_fn(batch, step):
        if seen is not None:
            seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}

    config = LoopConfig(steps=steps, lr=1e-2, optimizer="adamw", checkpoint_every=2, keep_last=5)
    history = train(step_fn, {"net": model}, config=config, ckpt_dir=ckpt_dir, batch_fn=_batch,
                    run_config=run_config, progress=False, **kwargs)
    return model, history


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. resuming with another stage configuration
def _npedit(**changes):
    return NPEditConfig.for_profile("smoke", **changes).to_dict()


def _with_world(**changes):
    config = _npedit()
    return {**config, "world": {"resolution": 32, "max_objects": 3, **changes}}


@pytest.mark.bad_input
@pytest.mark.parametrize("old, new, field, shown", [
    (_npedit(), _npedit(variant="dmd_only"), "variant", "'full' -> 'dmd_only'"),
    (_npedit(), _npedit(lambda_vlm=0.5), "lambda_vlm", "1.0 -> 0.5"),
    (_npedit(), _npedit(teacher_id="someone/teacher"), "teacher_id", "'' -> 'someone/teacher'"),
    (_npedit(), _npedit(betas=(0.9, 0.999)), "betas", "[0.0, 0.9] -> [0.9, 0.999]"),
    (_with_world(), _with_world(max_objects=2), "world.max_objects", "3 -> 2"),
], ids=["variant", "loss_weight", "teacher", "betas", "nested_world"])
def test_resume_with_another_stage_config_is_refused(tmp_path, old, new, field, shown):
    _run(tmp_path, 2, run_config=old)
    message = expect_bad(_run, tmp_path, 4, run_config=new, names=[tmp_path / "step_00000002", field, shown],
                         fix="allow_config_change=True")
    assert "new checkpoint folder" in message
    unchanged = sorted(set(old) - {field.split(".")[0]})[0]
    assert f"{unchanged}:" not in message  # only the fields that differ are named


def test_resume_may_extend_steps_and_change_cadence_and_threads(tmp_path):
    straight, _ = _run(tmp_path / "a", 4, run_config=_npedit(steps=4))
    _run(tmp_path / "b", 2, run_config={**_npedit(steps=2, checkpoint_every=1, curve_every=1), "num_threads": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        extended, history = _run(tmp_path / "b", 4, run_config={**_npedit(steps=4, checkpoint_every=3, curve_every=7),
                                                                 "num_threads": 1})
    assert len(history) == 4 and _same(straight.state_dict(), extended.state_dict())


def test_allow_config_change_resumes_with_a_warning(tmp_path):
    seen: dict = {}
    first, _ = _run(tmp_path, 2, run_config=_npedit())
    with pytest.warns(UserWarning, match="variant: 'full' -> 'dmd_only'"):
        _run(tmp_path, 4, run_config=_npedit(variant="dmd_only"), seen=seen, allow_config_change=True)
    assert sorted(seen) == [2, 3] and _same(seen[2], first.state_dict())


def test_manifest_records_the_stage_config_hash(tmp_path):
    _run(tmp_path, 2, run_config=_npedit())
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    assert manifest["stage_config_sha256"] == checkpoint.config_hash(_npedit())
    assert checkpoint.config_hash(_npedit()) == checkpoint.config_hash({**_npedit(steps=99), "num_threads": 3})
    assert checkpoint.config_hash(_npedit()) != checkpoint.config_hash(_npedit(variant="dmd_only"))
    assert set(manifest["sha256"]) == set(manifest["files"])


# --- 2. a corrupt newest checkpoint
def _corrupt(folder, damage: str):
    if damage == "weights":
        flip_byte(folder / "weights_net.safetensors", -4)  # the last weight: the header still parses
        return folder / "weights_net.safetensors"
    if damage == "state":
        path = folder / "state.pt"
        flip_byte(path, path.stat().st_size // 2)
        return path
    if damage == "config":
        path = folder / "config.json"
        flip_byte(path, path.stat().st_size // 2)
        return path
    (folder / "manifest.json").unlink()
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["weights", "state", "config", "manifest_deleted"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    first_seen: dict = {}
    straight, _ = _run(tmp_path, 4, seen=first_seen)
    named = _corrupt(tmp_path / "step_00000004", damage)
    seen: dict = {}
    with pytest.warns(UserWarning) as records:
        resumed, history = _run(tmp_path, 4, seen=seen)
    text = _messages(records)
    assert str(named) in text and "step_00000002" in text, text
    assert sorted(seen) == [2, 3] and _same(seen[2], first_seen[2])  # restarted from step 2's weights
    assert len(history) == 4 and _same(resumed.state_dict(), straight.state_dict())
    assert latest_checkpoint(tmp_path).name == "step_00000004" and not checkpoint.verify_checkpoint(
        latest_checkpoint(tmp_path))
    if damage != "manifest_deleted":  # the damaged copy is kept aside for a look, out of the way
        assert [p.name for p in tmp_path.glob("corrupt-step_00000004*")]


@pytest.mark.bad_input
def test_load_checkpoint_names_the_corrupt_file(tmp_path):
    _run(tmp_path, 2)
    named = _corrupt(tmp_path / "step_00000002", "weights")
    expect_bad(load_checkpoint, tmp_path / "step_00000002", {"net": _tiny()}, names=named, fix="previous checkpoint")


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["weights", "state"])
def test_every_checkpoint_corrupt_stops_with_the_folder_and_the_fix(tmp_path, damage):
    _run(tmp_path, 4)
    for folder in list_checkpoints(tmp_path):
        _corrupt(folder, damage)
    with pytest.warns(UserWarning):
        expect_bad(_run, tmp_path, 6, names=[tmp_path, "step_00000002", "step_00000004"], fix="delete")
    assert len(list_checkpoints(tmp_path)) == 2  # nothing was moved or removed: the user decides


def test_checkpoints_without_checksums_still_load(tmp_path):
    first, _ = _run(tmp_path, 2, run_config=_npedit())
    manifest_path = tmp_path / "step_00000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = {"step": manifest["step"], "files": manifest["files"]}  # what the first format held
    manifest_path.write_text(json.dumps(old))
    seen: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path, 4, run_config=_npedit(), seen=seen)
    assert sorted(seen) == [2, 3] and _same(seen[2], first.state_dict())


@pytest.mark.bad_input
def test_config_change_is_caught_in_checkpoints_without_a_config_hash(tmp_path):
    _run(tmp_path, 2, run_config=_npedit())
    path = tmp_path / "step_00000002" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({"step": manifest["step"], "files": manifest["files"]}))
    expect_bad(_run, tmp_path, 4, run_config=_npedit(variant="dmd_only"), names="variant: 'full' -> 'dmd_only'",
               fix="allow_config_change=True")


# --- 4. a full disk
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_disk_full(*args, **kwargs):  # what safetensors raises on ENOSPC (not an OSError)
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')


def _torch_disk_full(*args, **kwargs):  # what torch.save's zip writer raises on ENOSPC
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed (No space left on device)")


@pytest.mark.bad_input
@pytest.mark.parametrize("writer, failure", [("save_file", _disk_full), ("save", _disk_full),
                                             ("save_file", _safetensors_disk_full), ("save", _torch_disk_full)],
                         ids=["safetensors_oserror", "torch_oserror", "safetensors_error", "torch_runtime_error"])
def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch, writer, failure):
    model = _tiny()
    save_checkpoint(tmp_path, 2, modules={"net": model}, state={"history": []})
    monkeypatch.setattr(checkpoint if writer == "save_file" else checkpoint.torch, writer, failure)
    message = expect_bad(save_checkpoint, tmp_path, 4, modules={"net": model}, state={"history": []},
                         names=[tmp_path, "step_00000002"], fix="free")
    assert "intact" in message and "No space left" in message
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]  # the temporary folder is gone
    assert load_checkpoint(tmp_path / "step_00000002", {"net": _tiny(1)})["step"] == 2


@pytest.mark.bad_input
def test_disk_full_during_training_names_the_intact_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, 2)
    monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    expect_bad(_run, tmp_path, 4, names=[tmp_path, "step_00000002", "intact"], fix="point the checkpoint folder")
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000002" and not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------------------ artifact cache
def _build(calls):
    def build():
        calls.append(1)
        return {"w": torch.arange(64, dtype=torch.float32)}, {"note": "built"}
    return build


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "emptied", "meta_garbage"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, damage):
    calls: list = []
    first = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    tensors = first.path / "tensors.safetensors"
    named = tensors
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-40])
    elif damage == "bit_flip":
        flip_byte(tensors, -4)
    elif damage == "emptied":
        tensors.write_bytes(b"")
    else:
        named = first.path / "meta.json"
        named.write_text('{"note": "bu')
    with pytest.warns(UserWarning) as records:
        again = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    assert str(named) in _messages(records), _messages(records)
    assert len(calls) == 2 and not again.hit and again.meta == {"note": "built"}
    assert torch.equal(again.tensors["w"], torch.arange(64, dtype=torch.float32))
    third = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    assert third.hit and len(calls) == 2 and torch.equal(third.tensors["w"], again.tensors["w"])
    assert list((tmp_path / "thing").glob(".corrupt-*"))  # moved aside, not left in the way


@pytest.mark.bad_input
def test_corrupt_cache_entry_of_a_module_is_retrained(tmp_path):
    trained = []

    def train_fn(module):
        trained.append(1)
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(0.5)
        return {"loss": 0.1}

    _, artifact = cache.ensure_module("net", {"a": 1}, _tiny(), train_fn, root=tmp_path)
    flip_byte(artifact.path / "tensors.safetensors", -4)
    with pytest.warns(UserWarning, match="tensors.safetensors"):
        module, again = cache.ensure_module("net", {"a": 1}, _tiny(1), train_fn, root=tmp_path)
    assert len(trained) == 2 and all(bool((p == 0.5).all()) for p in module.parameters())


def _io_error(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.bad_input
@pytest.mark.parametrize("failure", [_disk_full, _io_error, _safetensors_disk_full], ids=["enospc", "eio", "safetensors"])
def test_disk_full_while_caching_is_a_clear_error(tmp_path, monkeypatch, failure):
    monkeypatch.setattr(cache, "save_file", failure)
    folder = cache.artifact_dir("thing", {"a": 1}, tmp_path)
    expect_bad(cache.save, "thing", {"a": 1}, {"w": torch.zeros(3)}, root=tmp_path, names=folder,
               fix="NB_EDIT_CACHE")
    assert not list((tmp_path / "thing").iterdir())  # no temporary folder left


@pytest.mark.bad_input
def test_disk_full_while_caching_keeps_what_was_built(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "save_file", _disk_full)
    calls: list = []
    with pytest.warns(UserWarning, match="NB_EDIT_CACHE"):
        built = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    assert len(calls) == 1 and not built.hit and torch.equal(built.tensors["w"], torch.arange(64.0))


def test_cache_entries_without_checksums_still_load(tmp_path):
    calls: list = []
    first = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    for extra in first.path.iterdir():
        if extra.name not in ("tensors.safetensors", "config.json", "meta.json"):
            extra.unlink()  # what an entry of the first format holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cache.ensure("thing", {"a": 1}, _build(calls), root=tmp_path)
    assert again.hit and len(calls) == 1


# ------------------------------------------------------------------------------ model folders
def _judge_tokenizer():
    return build_tokenizer([" ".join(TEMPLATE_WORDS) + " is it red ?"])


@pytest.fixture(scope="module")
def judge():
    return VLMJudge.tiny("llava", _judge_tokenizer(), seed=0).freeze()


@pytest.mark.bad_input
def test_judge_folder_with_only_pickle_weights_is_refused(tmp_path, judge):
    judge.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")
    weights.unlink()
    expect_bad(VLMJudge.from_pretrained, tmp_path, device="cpu", names=tmp_path, fix="safetensors")


@pytest.mark.bad_input
def test_editor_folder_with_only_pickle_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    editor = build_editor("unet", tiny_unet_config())
    save_components(tmp_path, editor=editor)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    expect_bad(load_editor, tmp_path, "unet", names=tmp_path / "unet", fix="safetensors")


# ------------------------------------------------------------------------------ image tensors
def _bad_images(kind: str, batch: int = 2) -> torch.Tensor:
    images = torch.rand(batch, 3, 32, 32) * 1.8 - 0.9
    if kind == "nan":
        images[0, 1, 2, 3] = float("nan")
    elif kind == "inf":
        images[1, 0, 0, 0] = float("inf")
    elif kind == "0_255":
        images = (images + 1) * 127.5
    elif kind == "channels_last":
        images = images.permute(0, 2, 3, 1)
    elif kind == "uint8":
        images = ((images + 1) * 127.5).to(torch.uint8)
    return images


PROBLEM = {"nan": "1 NaN", "inf": "1 Inf", "0_255": "[-1, 1]", "channels_last": "(B, 3, H, W)",
           "uint8": "uint8"}


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["make the circle red"])
    return EditPipeline(build_editor("dit", tiny_flux_config()).eval(), build_tiny_text_encoder(tokenizer).eval(),
                        PixelAutoencoder())


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["nan", "inf", "0_255", "channels_last", "uint8"])
def test_pipeline_refuses_bad_source_tensors(pipeline, kind):
    expect_bad(pipeline.edit, _bad_images(kind), ["make the circle red"] * 2, steps=1,
               names=["sources", PROBLEM[kind]], fix="to_tensor")


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["nan", "inf", "0_255", "channels_last"])
def test_judge_refuses_bad_image_tensors(judge, kind):
    good = _bad_images("none")
    expect_bad(judge.yes_no_logits, [good, _bad_images(kind)], ["is it red ?"] * 2,
               names=["images[1]", PROBLEM[kind]], fix="to_tensor")


@pytest.mark.bad_input
def test_judge_score_refuses_0_255_floats(judge):
    expect_bad(judge.expected_score, [_bad_images("0_255"), _bad_images("none")], ["is it red ?"] * 2,
               names=["images[0]", "[-1, 1]"], fix="to_tensor")


@pytest.mark.bad_input
def test_check_image_tensor_refuses_arrays():
    expect_bad(check_image_tensor, _bad_images("none").numpy(), "sources", names=["sources", "ndarray"],
               fix="to_tensor")


def test_check_image_tensor_passes_good_tensors_and_model_outputs(judge):
    good = _bad_images("none")
    assert check_image_tensor(good, "x") is good
    assert check_image_tensor(torch.tensor([[[[1.05]]] * 3]), "x") is not None  # resize overshoot is fine
    # a generator's output inside a training step carries a gradient: the loop's guard owns it
    output = (_bad_images("none") * 3).requires_grad_()
    yes, no = judge.yes_no_logits([good, output], ["is it red ?"] * 2)
    assert yes.shape == (2,)


def test_a_writer_bug_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("cannot serialize a lambda")

    monkeypatch.setattr(checkpoint.torch, "save", bug)
    with pytest.raises(TypeError, match="lambda"):
        save_checkpoint(tmp_path, 2, modules={"net": _tiny()}, state={"history": []})
    assert not list(tmp_path.iterdir())  # its temporary folder is gone all the same
