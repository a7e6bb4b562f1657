"""Run every benchmark, one after the other (never two at once: they would slow each other down).

    python bench/run.py --quick     # tiny model: about ten minutes
    python bench/run.py             # GPT-2 124M architecture: the figures in the README

Needs the bench extra: pip install -e ".[bench]"
"""
import subprocess
import sys
from pathlib import Path

SCRIPTS = [["generation.py"], ["train_speed.py"], ["qlora.py"], ["scaling.py"], ["seeds_recipe.py"], ["seeds_recipe.py", "--recipe", "bert"]]

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for script, *options in SCRIPTS:
        print(f"\n## {' '.join([script, *options])}", flush=True)
        subprocess.run([sys.executable, str(here / script), *options, *sys.argv[1:]], check=True)
