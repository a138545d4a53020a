"""Opt-in tests against a real ComfyUI. A package, so that its conftest.py does not shadow tests/conftest.py (`from conftest import ...`)."""
