"""Helpers the tests share, each module one job:

* :mod:`support.comfy_runtime` - finding a ComfyUI checkout (``COMFYUI_PATH``) and running its code
  in the test process with a temporary base directory;
* :mod:`support.tiny_checkpoints` - tiny random-weight SD1.x / SD2.x / SDXL checkpoints that
  ComfyUI's own loader detects, built here and cached outside any checkout;
* :mod:`support.comfy_server` - a real ComfyUI server on loopback (``/prompt``, ``/history``, its
  websocket events) for the workflow tests;
* :mod:`support.server_nodes` - test-only custom nodes loaded into that server;
* :mod:`support.workflows` - the front end's UI-workflow to API-prompt conversion;
* :mod:`support.tiny_clip_vision` - a tiny CLIP vision model ComfyUI's loader class builds;
* :mod:`support.images` - small synthetic training images.
"""
