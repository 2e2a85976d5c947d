"""The README's serving examples, run as written against the main job's server
(`python launch/serve.py`, the embedded SmolLM2-135M-Instruct) on a free 127.0.0.1 port in place
of the README's 8000; the greedy replies equal the offline `LLM.chat` / `LLM.generate` ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kcache_dist import LLM, SamplingParams
from test_server import ROOT, ServerProcess

README_ADDRESS = "127.0.0.1:8000"


def serving_examples() -> tuple[str, str]:
    """(the curl command, the Python example) of the README's Serving section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    (curl,) = [c for c in re.findall(r"```bash\n(.*?)\n```", section, flags=re.S) if c.startswith("curl ")]
    (python,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    assert README_ADDRESS in curl and README_ADDRESS in python
    return curl, python


@pytest.fixture(scope="module")
def default_server(default_model_dir, tmp_path_factory):
    """The main job's command, `python launch/serve.py`, on a free port."""
    proc = ServerProcess([], str(tmp_path_factory.mktemp("logs") / "default_server.log"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def offline(default_model_dir) -> LLM:
    return LLM(device="cpu")


def test_readme_curl_example(default_server, offline):
    curl, _ = serving_examples()
    body = json.loads(re.search(r"-d '(.*?)'", curl, flags=re.S).group(1))
    command = curl.replace(README_ADDRESS, f"127.0.0.1:{default_server.port}")
    result = subprocess.run(["bash", "-c", command + " --silent --show-error --max-time 60"], capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    expected = offline.chat(body["messages"], SamplingParams(temperature=body["temperature"],
                                                             max_tokens=body["max_tokens"]))[0]
    assert reply["model"] == body["model"] == "SmolLM2-135M-Instruct"
    assert reply["choices"][0]["message"]["content"] == expected.outputs[0].text
    assert "Paris" in expected.outputs[0].text
    assert reply["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)


def test_readme_python_example(default_server, offline):
    _, python = serving_examples()
    code = python.replace(README_ADDRESS, f"127.0.0.1:{default_server.port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    chat = offline.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    completion = offline.generate("The capital of France is",
                                  SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert result.stdout == f"{chat}\n{completion}\n"
