"""The DreamBooth nodes inside a real ComfyUI: they train on tiny SD1.x and SDXL checkpoints loaded
by CheckpointLoaderSimple, their MODEL samples through ComfyUI's KSampler to a different result
than the input model, the LoRA file reloads through LoraLoader with no "lora key not loaded", and
the full fine-tune's checkpoint loads through CheckpointLoaderSimple.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest tests/test_comfy_dreambooth.py -q
"""
from __future__ import annotations

import logging

import pytest
import torch

from support import comfy_runtime

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]


@pytest.fixture(scope="module")
def node_classes(likeness_nodes):
    return {k: likeness_nodes[k] for k in
            ("LikenessTrainDreamBoothLoRA", "LikenessTrainDreamBoothFull", "LikenessTrainPivotal")}


@pytest.fixture(scope="module")
def folders(comfy_root, tmp_path_factory):
    """ComfyUI's loras / checkpoints / embeddings folders for this module: temp dirs first in each
    list (the nodes write to the first), the real checkpoints folder kept so the tiny models load."""
    import folder_paths

    mp = pytest.MonkeyPatch()
    out = {}
    for kind in ("loras", "checkpoints", "embeddings"):
        path = tmp_path_factory.mktemp(kind)
        paths, exts = folder_paths.folder_names_and_paths[kind]
        mp.setitem(folder_paths.folder_names_and_paths, kind, ([str(path), *paths], exts))
        out[kind] = path
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def sd1(folders):
    return comfy_runtime.load_tiny("sd15")


@pytest.fixture(scope="module")
def sdxl(folders):
    return comfy_runtime.load_tiny("sdxl")


def _run(node_cls, **inputs):
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": "9"}})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs)


def _inputs(ckpt, size, **kw):
    model, clip, vae = ckpt
    base = dict(model=model, clip=clip, vae=vae, images=torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(0)),
                name="lkdb", instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", prior_weight=1.0,
                num_class_images=1, steps=2, learning_rate=1e-2, batch_size=1, resolution=0, flip=False,
                min_snr_gamma=5.0, noise_offset=0.0, gradient_checkpointing=True, seed=0, preview_every=2,
                save_every=0, overwrite=True)
    base.update(kw)
    return base


def _weights(model):
    """The shared weights as ``model`` itself sees them: loading it first undoes whatever patched
    clone (a LoRA sampled earlier) ComfyUI left loaded - ComfyUI patches weights in place."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _ksample(model, clip, size, seed=3):
    import nodes

    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of sks dog")
        (neg,) = nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(size, size, 1)
        (out,) = nodes.KSampler().sample(model, seed, 3, 4.0, "euler", "normal", pos, neg, latent)
    return out["samples"].clone()


@pytest.fixture
def log_lines():
    lines = []

    class H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = H()
    logging.getLogger().addHandler(h)
    yield lines
    logging.getLogger().removeHandler(h)


LORA_EXTRA = dict(rank=4, alpha=0.0, targets="transformer", train_text_encoder=True, text_encoder_lr=1e-2)


@pytest.mark.parametrize("arch,size", [("sd1", 64), pytest.param("sdxl", 128, marks=pytest.mark.slow)])
def test_lora_node_trains_samples_differently_and_reloads_through_loraloader(
        request, node_classes, folders, log_lines, arch, size):
    import nodes

    ckpt = request.getfixturevalue(arch)
    model, clip, _ = ckpt
    before = _weights(model)
    out = _run(node_classes["LikenessTrainDreamBoothLoRA"], **_inputs(ckpt, size, name=f"lkdb_{arch}", **LORA_EXTRA))
    trained_model, trained_clip, lora_name, preview, loss, curves = out.result
    assert curves.ndim == 4 and curves.shape[-1] == 3  # an IMAGE even with evaluation off
    after = _weights(model)  # (sampling a patched clone later patches the shared weights, as ComfyUI does)
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed the input model's weights"
    assert lora_name == f"lkdb_{arch}.safetensors" and (folders["loras"] / lora_name).is_file()
    assert len(loss["loss"]) == 2 and preview.shape[-1] == 3
    assert trained_model is not model and len(trained_model.patches) > 0 and len(trained_clip.patcher.patches) > 0

    base = _ksample(model, clip, size)
    tuned = _ksample(trained_model, trained_clip, size)
    assert not torch.allclose(base, tuned, atol=1e-4), "the trained MODEL samples like the input model"

    log_lines.clear()
    with torch.inference_mode():
        loaded_model, loaded_clip = nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
    assert not [ln for ln in log_lines if "lora key not loaded" in ln]
    assert set(loaded_model.patches) == set(trained_model.patches)
    assert set(loaded_clip.patcher.patches) == set(trained_clip.patcher.patches)
    # the fp16 file samples like the node's fp32 output
    assert torch.allclose(_ksample(loaded_model, loaded_clip, size), tuned, atol=2e-2)


def test_full_node_checkpoint_loads_through_checkpointloadersimple(node_classes, folders, sd1):
    model, clip, _ = sd1
    before = _weights(model)
    out = _run(node_classes["LikenessTrainDreamBoothFull"],
               **_inputs(sd1, 64, name="lkfull", learning_rate=1e-3, optimizer="adafactor",
                         train_text_encoder=False, text_encoder_lr=1e-6, extract_lora_rank=2))
    trained_model, trained_clip, ckpt_name, _, _, _ = out.result
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed the input model's weights"
    assert ckpt_name == "lkfull.safetensors" and (folders["checkpoints"] / ckpt_name).is_file()
    assert (folders["loras"] / "lkfull_lora.safetensors").is_file()
    reloaded_model, reloaded_clip, _ = comfy_runtime.load_checkpoint(ckpt_name)
    tuned = _ksample(trained_model, trained_clip, 64)
    assert torch.allclose(_ksample(reloaded_model, reloaded_clip, 64), tuned, atol=2e-2)
    assert not torch.allclose(_ksample(model, clip, 64), tuned, atol=1e-4)


def test_pivotal_node_writes_embedding_and_lora(node_classes, folders, sd1, log_lines):
    import nodes

    model, clip, _ = sd1
    out = _run(node_classes["LikenessTrainPivotal"],
               **_inputs(sd1, 64, name="lkpiv", instance_prompt="a photo of lkpiv_tok dog", token="lkpiv_tok",
                         init_text="", num_vectors=2, ti_learning_rate=5e-2, ti_fraction=0.5, rank=4,
                         targets="attention", bundle_embedding=False))
    trained_model, trained_clip, embedding, lora_name, _, _, _ = out.result
    assert embedding == "embedding:lkpiv_tok" and lora_name == "lkpiv.safetensors"
    assert (folders["embeddings"] / "lkpiv_tok.safetensors").is_file()
    log_lines.clear()
    with torch.inference_mode():
        nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
        (cond,) = nodes.CLIPTextEncode().encode(trained_clip, "a photo of embedding:lkpiv_tok dog")
    assert not [ln for ln in log_lines if "lora key not loaded" in ln or "embedding" in ln.lower() and "not" in ln]
    assert cond[0][0].shape[1] == 77


def test_unsupported_model_is_a_clear_error(node_classes, folders, sd1):
    """A model-sampling patch Likeness cannot train against: refused before anything is written."""
    import comfy.model_sampling

    model, clip, vae = sd1

    class EDM(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM):
        pass

    with torch.inference_mode():
        patched = model.clone()
        patched.add_object_patch("model_sampling", EDM(patched.model.model_config))
    with pytest.raises(ValueError, match="discrete noise schedule"):
        _run(node_classes["LikenessTrainDreamBoothLoRA"], **_inputs((patched, clip, vae), 64, name="lkbad", **LORA_EXTRA))
    assert not (folders["loras"] / "lkbad.safetensors").exists()


@pytest.mark.parametrize("family,cfg", [
    ("sd1", dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1] * 9 + [0] * 3)),
    ("sdxl", dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])),
])
def test_unet_layout_of_the_real_models(family, cfg):
    """ComfyUI lists output-block depths back to front (its UNetModel pops them from the end); the
    layout read from the real models' detected configs must be the real layouts LoRA names assume."""
    import types

    from likeness.hosts.comfy import ComfyHost
    from likeness.trainers.formats.unet_names import DEFAULT_LAYOUTS

    fake = types.SimpleNamespace(_model=types.SimpleNamespace(model=types.SimpleNamespace(
        model_config=types.SimpleNamespace(unet_config=cfg))))
    got = ComfyHost.unet_layout(fake)
    want = DEFAULT_LAYOUTS[family]
    assert (got.layers_per_block, got.up_attention) == (want.layers_per_block, want.up_attention)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16-file", "fp32-file"])
def test_an_untrained_checkpoint_is_written_back_bit_identical_to_its_file(tmp_path, dtype):
    """ComfyUI computes a file in its own dtype (fp32 on this CPU, fp16 on most GPUs) and its own
    save writes that copy; the host puts every tensor nobody trained back as the user's file had it,
    so a full fine-tune of 0 steps is the source file, bits and dtype, and a trained weight is not."""
    import comfy.sd
    from safetensors.torch import load_file, save_file
    from support import tiny_checkpoints

    from likeness.hosts.comfy import ComfyHost

    source = tmp_path / "source.safetensors"
    sd = load_file(str(tiny_checkpoints.ensure_tiny_checkpoint("sd15")))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(source))
    with torch.inference_mode():
        host = ComfyHost(*comfy.sd.load_checkpoint_guess_config(str(source))[:3])
    src = load_file(str(source))
    written = load_file(str(host.save_checkpoint(tmp_path / "zero.safetensors", {})))
    same = [k for k in src if k in written]
    assert len(same) > 0.9 * len(src)
    assert all(written[k].dtype == src[k].dtype and torch.equal(written[k], src[k]) for k in same)
    name = next(n for n in host.tunable_parameters("unet") if n.endswith("attn2.to_k.weight"))
    w = host.tunable_parameters("unet")[name]
    trained = load_file(str(host.save_checkpoint(tmp_path / "one.safetensors", {name: torch.full_like(w, 0.5)})))
    changed = [k for k in same if not torch.equal(trained[k].to(src[k].dtype), src[k])]
    assert len(changed) == 1 and changed[0].endswith(name.rsplit(".", 3)[-3] + ".to_k.weight"), changed


def test_lora_node_continues_from_a_lora_file_in_the_loras_folder(node_classes, folders, sd1):
    """"Train 2 more steps on what I have": init_lora names a file LoraLoader lists; the new file has
    the old one's layers and rank (not the node's rank input), and its step count continues."""
    from safetensors import safe_open

    lora = node_classes["LikenessTrainDreamBoothLoRA"]
    first = dict(LORA_EXTRA, rank=2, train_text_encoder=False)
    _run(lora, **_inputs(sd1, 64, name="lkbase", prior_weight=0.0, class_prompt="", **first))
    out = _run(lora, **_inputs(sd1, 64, name="lkmore", prior_weight=0.0, class_prompt="",
                               **dict(first, rank=8), init_lora="lkbase.safetensors"))
    assert out.result[2] == "lkmore.safetensors"
    assert "continued lkbase.safetensors" in str(out.ui) and "rank, alpha and targets inputs were not used" in str(out.ui)
    with safe_open(str(folders["loras"] / "lkbase.safetensors"), "pt") as a, \
            safe_open(str(folders["loras"] / "lkmore.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        downs = [k for k in b.keys() if k.endswith("lora_down.weight")]
        assert downs and all(b.get_tensor(k).shape[0] == 2 for k in downs)  # the file's rank, not 8
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in downs)  # trained on
        assert int(b.metadata()["ss_steps"]) == int(a.metadata()["ss_steps"]) + 2
