"""Model presets (TOML), installed with the package as ``farmer_cli.presets``."""
