"""Best step in the shapes world (issue 16; world/best_step.py): DreamBooth LoRA and full trained
long enough to overfit, with best step on (the world classifier's embedding as the image encoder);
per snapshot the metrics next to the classifier's concept and prompt fidelity on held-out prompts,
the pick, whether it scores at least as well as the last step on the classifier's combined
measure, Spearman's rho, and the wall time evaluation added.

    python bench/best_step.py [--concept moon] [--modes lora full] [--steps 900] [--eval-every 100] \\
        [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    import torch

    from likeness.world import best_step as W

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="moon", choices=["moon", "checked"])
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=900, help="3x the quality benchmark's 300: long enough to overfit")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--full-lr", type=float, default=3e-4)
    p.add_argument("--n", type=int, default=32, help="held-out prompts the classifier reads per snapshot")
    p.add_argument("--eval-prompts", type=int, default=8, help="evaluation prompts best step samples per snapshot")
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="likeness-bench-best-step")
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    opts = dict(steps=a.steps, eval_every=a.eval_every, lora_lr=a.lora_lr, full_lr=a.full_lr, n_test=a.n,
                sample_steps=a.sample_steps, eval_prompts=a.eval_prompts)
    runs = W.run_all(a.concept, a.modes, out_dir=a.out, opts=opts, log=lambda s: print(s, flush=True))
    for r in runs:
        print(f"{r.mode}: best step {r.best_step}, holds {r.pick_holds}, rho {r.rho:.2f}, train {r.train_s:.0f} s, "
              f"evaluation {r.eval_s:.0f} s", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.markdown:
        cmd = "python bench/best_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        W.write_markdown(a.markdown, runs, cmd.strip())
        print(f"wrote the table into {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
