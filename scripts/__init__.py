"""Quick-start scripts; demo.py runs as `python -m scripts.demo` from the checkout root (see demo.sh)."""
