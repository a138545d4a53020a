"""The shipped workflows and their builder: `python -m workflows.build_workflows` from the checkout root."""
