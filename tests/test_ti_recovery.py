"""Recovery: Textual Inversion finds a word the model already knows, from that word's images.

A tiny model briefly trained on a few classes named by real words (tests/tiny_models.py) renders
images of one class; TI started from another class's word must bring the denoising loss on those
images down to about the loss of the true word's embedding, and far below where it started.  (A
random-weight model cannot show this: it barely depends on its conditioning - testing.md.)
"""
import torch

from likeness.trainers import data as D
from likeness.trainers.objective import held_out_loss
from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion

TARGET, START, NAME = "zebra", "violin", "sks-new"


def _eval_loss(host, latents, vectors):
    """Native denoising loss on fixed (timestep, noise) draws: the same yardstick for every vector."""
    with torch.no_grad():
        cond = host.encode_text([f"a photo of a {NAME}"] * latents.shape[0], NAME, vectors)
    return held_out_loss(host, latents, cond, draws=24)


def test_ti_recovers_a_known_word(pretrained_tiny_sd1, tmp_path):
    pt = pretrained_tiny_sd1
    host = pt.host
    images = D.images_from_batch(pt.images(TARGET, 4, seed=7), [f"a photo of a {NAME}"] * 4)
    eval_latents = pt.latents(TARGET, 8, seed=99)  # held-out images of the same class
    true = host.token_embeddings(TARGET)
    start = host.token_embeddings(START)
    loss_true, loss_start = _eval_loss(host, eval_latents, true), _eval_loss(host, eval_latents, start)
    assert loss_start > 1.15 * loss_true, "the pretrained model must tell the classes apart"

    cfg = TIConfig(name=NAME, output_dir=tmp_path, init_text=START, steps=120, learning_rate=2e-2,
                   batch_size=8, flip=False, templates="captions", save_every=0, preview_every=0, seed=1)
    res = train_textual_inversion(host, images, cfg)
    loss_learned = _eval_loss(host, eval_latents, res.vectors)
    print(f"eval loss: true {loss_true:.4f} start {loss_start:.4f} learned {loss_learned:.4f}")
    # near the true embedding's loss ...
    assert loss_learned < loss_true * 1.05
    # ... and most of the gap from the start closed
    assert loss_start - loss_learned > 0.8 * (loss_start - loss_true)
    # training loss fell too
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < first
