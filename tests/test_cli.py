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
