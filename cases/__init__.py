"""Case suites (TOML), installed as ``gdncheck_cases``."""
