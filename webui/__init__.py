"""Likeness as a Stable Diffusion WebUI extension: the run manager every entry point shares
(``runs.py``), the HTTP API (``api.py``), the **Likeness** tab (``tab.py``) and what ties them to
the running WebUI (``app.py``).  ``scripts/likeness_webui.py`` is what the WebUI loads."""
