"""``python -m farmer_cli`` (also what ``accelerate launch -m farmer_cli`` runs)."""

from farmer_cli.app import main

main()
