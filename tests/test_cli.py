"""`likeness ti` on a tiny diffusers folder: the same trainer and files as the nodes."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from likeness import cli


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_sd1_host):
    import tiny_models

    return tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host),
                                             tmp_path_factory.mktemp("model") / "tiny-sd1")


def _images(folder, n=3, mode="RGB"):
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).convert(mode).save(folder / f"{i}.png")
    return folder


def test_cli_trains_and_writes_the_embedding_and_preview(tiny_folder, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    out = tmp_path / "emb"
    rc = cli.main(["ti", "--model", str(tiny_folder), "--images", str(imgs), "--name", "sks-cli", "--steps", "3",
                   "--preview-every", "3", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    st = load_file(str(out / "sks-cli.safetensors"))
    assert st["emb_params"].shape == (1, 32)
    assert torch.load(out / "sks-cli.pt", weights_only=True)["step"] == 3
    with Image.open(out / "sks-cli.preview.png") as im:
        assert im.size == (64, 64)
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "wrote" in printed


@pytest.mark.parametrize("problem,args,match", [
    ("grayscale", ["--name", "sks-x"], "grayscale"),
    ("name", ["--name", "../up"], "separator|\\.\\."),
    ("vocab", ["--name", "dog"], "word"),
])
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(tiny_folder, tmp_path, capsys, problem, args, match):
    imgs = _images(tmp_path / "imgs", mode="L" if problem == "grayscale" else "RGB")
    out = tmp_path / "emb"
    rc = cli.main(["ti", "--model", str(tiny_folder), "--images", str(imgs), "--steps", "2", "--out", str(out),
                   "--device", "cpu", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert "likeness: error:" in err
    import re
    assert re.search(match, err)
    assert not out.exists() or not any(out.iterdir())


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    rc = cli.main(["ti", "--model", str(tmp_path / "imgs"), "--images", str(imgs), "--name", "sks-y",
                   "--out", str(tmp_path / "emb")])
    assert rc == 2 and "not a diffusers model" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["lora", "full", "pivotal"])
def test_cli_dreambooth_writes_each_modes_files(tiny_folder, tmp_path, capsys, mode):
    imgs = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    args = ["dreambooth", "--model", str(tiny_folder), "--images", str(imgs), "--name", "subj", "--mode", mode,
            "--instance-prompt", "a photo of lkcli_tok dog", "--class-prompt", "a photo of a dog",
            "--num-class-images", "2", "--steps", "2", "--preview-every", "2", "--out", str(out),
            "--embeddings-out", str(tmp_path / "emb"), "--device", "cpu"]
    if mode == "pivotal":
        args += ["--token", "lkcli_tok"]
    if mode == "full":
        args += ["--extract-rank", "2"]
    assert cli.main(args) == 0
    assert (out / "subj.safetensors").is_file() and (out / "subj.preview.png").is_file()
    if mode == "full":
        assert (out / "subj_lora.safetensors").is_file()
        assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(str(out / "subj.safetensors"))
    if mode == "pivotal":
        assert (tmp_path / "emb" / "lkcli_tok.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "class images 2/2" in printed and "step 2/2" in printed and "wrote" in printed


def test_cli_dreambooth_bad_input_is_an_error_before_work(tiny_folder, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    rc = cli.main(["dreambooth", "--model", str(tiny_folder), "--images", str(imgs), "--name", "subj",
                   "--instance-prompt", "a photo of sks dog", "--rank", "0", "--out", str(tmp_path / "out"),
                   "--device", "cpu"])
    assert rc == 2
    assert "rank must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
