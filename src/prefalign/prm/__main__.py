"""``python -m prefalign.prm make-pairs|train-prm ...`` (the same commands as ``prefalign``'s)."""

from __future__ import annotations

import typer

from .cli import make_pairs, train_prm

app = typer.Typer(add_completion=False, help="Personalised reward models (PAD): make pairs, train a PRM.")
app.command("make-pairs")(make_pairs)
app.command("train-prm")(train_prm)

if __name__ == "__main__":
    app()
