"""The README's two set-up commands stay true: CI runs exactly the second, the first names `gdncheck run`."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [ln.split("#")[0].strip() for ln in block.strip().splitlines()[:2]]


def test_ci_runs_the_readme_test_command():
    main, tests = _setup_lines()
    assert "gdncheck run" in main
    assert tests.endswith("pytest -n auto")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci
