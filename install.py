"""Run by Stable Diffusion WebUI (Forge, AUTOMATIC1111) at start-up for this extension.

Installs only what Likeness needs and the WebUI's environment lacks, by name and without a version,
so nothing the WebUI pins (torch, transformers, diffusers, safetensors...) is upgraded or
downgraded; prints what it did.  The trainers need nothing beyond what both WebUIs ship, so this is
normally a no-op that says so.
"""
import importlib.util

#: import name -> pip name of what the WebUI extension imports
NEEDED = {"torch": "torch", "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow",
          "einops": "einops", "transformers": "transformers"}


def missing() -> list[str]:
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def main() -> None:
    todo = missing()
    if not todo:
        print("[Likeness] every requirement is already installed; nothing to do")
        return
    if "torch" in todo:
        print("[Likeness] torch is missing: the WebUI installs its own build; not installing one")
        todo.remove("torch")
    import launch  # the WebUI's launcher (its pip, its index settings)

    for pip in todo:
        launch.run_pip(f"install {pip}", f"{pip} for Likeness")
        print(f"[Likeness] installed {pip}")


if __name__ == "__main__":  # the WebUI runs it as `python install.py` with its own root on PYTHONPATH
    main()
