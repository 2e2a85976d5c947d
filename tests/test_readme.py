"""The README's two set-up commands are the ones CI runs and the main job."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        setup = f.read().split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)


def test_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.endswith("python launch/serve.py") and "pytest" in tests
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert tests in f.read().splitlines()
