"""``python -m farmer_cli`` (also what ``accelerate launch -m farmer_cli`` runs)."""

from .app import main

main()
