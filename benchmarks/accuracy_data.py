"""Data set-up of the accuracy benchmark: public-domain text and a QA task that install offline.

    python benchmarks/accuracy_data.py            # fetch what is missing, print where it lies

Everything lands under `<cache root>/accuracy_data/` (the same user cache as the default model:
`$KCACHE_DIST_CACHE`, else `$XDG_CACHE_HOME/kcache_dist`, else `~/.cache/kcache_dist`), never in the
repository:

- `books/*.txt`: the Canterbury-corpus books of the `brotli==1.2.1` source archive
  (`tests/testdata/`: alice29 = Alice in Wonderland, asyoulik = As You Like It, lcet10 = a Library
  of Congress report, plrabn12 = Paradise Lost), from `pip download --no-binary :all:`.
- `bible_kjv.txt`: the King James Bible from Debian's `bible-kjv` package
  (`bible -l200 gen1:1-rev22:21`; the package is installed with apt-get when missing and we are root).
- `qa_wikidata.json`: BIG-bench's `qa_wikidata` task, taken from the `bigbench==1.0.0` source
  archive (358 MB; the archive stays in `<cache root>/downloads/` so it is fetched once).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kcache_dist.default_model import cache_root  # noqa: E402

BROTLI_REQUIREMENT = "brotli==1.2.1"
BROTLI_BOOKS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
QA_WIKIDATA_MEMBER = "bigbench/benchmark_tasks/qa_wikidata/task.json"
BIBLE_COMMAND = ("bible", "-l200", "gen1:1-rev22:21")


def data_dir() -> Path:
    """Where the benchmark's text and task files live (created on demand)."""
    return cache_root() / "accuracy_data"


def downloads_dir() -> Path:
    """Where downloaded archives are kept between runs."""
    return cache_root() / "downloads"


def book_paths() -> list[Path]:
    return [data_dir() / "books" / name for name in BROTLI_BOOKS]


def bible_path() -> Path:
    return data_dir() / "bible_kjv.txt"


def qa_wikidata_path() -> Path:
    return data_dir() / "qa_wikidata.json"


def _pip_download(requirement: str, dest: Path, source_only: bool) -> Path:
    """Download one source archive with pip into dest (kept); returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0]
    found = sorted(glob.glob(str(dest / f"{name}-*.tar.gz")))
    if found:
        return Path(found[-1])
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), requirement]
    if source_only:
        cmd[4:4] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = sorted(glob.glob(str(dest / f"{name}-*.tar.gz")))
    if not found:
        raise RuntimeError(f"pip download {requirement} left no source archive in {dest}")
    return Path(found[-1])


def _extract_member(archive: Path, member_suffix: str, out_path: Path) -> None:
    """Copy the archive member whose name ends with member_suffix to out_path (atomically)."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(member_suffix)), None)
        if member is None:
            raise RuntimeError(f"{archive.name} has no member ending in {member_suffix}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".partial")
        with tar.extractfile(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out_path)


def fetch_books() -> list[Path]:
    """The four brotli test-data books (small archive: downloaded to a temporary folder)."""
    paths = book_paths()
    if all(p.is_file() for p in paths):
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(BROTLI_REQUIREMENT, Path(tmp), source_only=True)
        for path in paths:
            _extract_member(archive, f"tests/testdata/{path.name}", path)
    return paths


def fetch_bible() -> Path:
    """The KJV Bible as plain text, through Debian's `bible` program."""
    path = bible_path()
    if path.is_file():
        return path
    if shutil.which(BIBLE_COMMAND[0]) is None:
        if os.geteuid() != 0:
            raise RuntimeError("the 'bible' program is missing: run `apt-get install -y bible-kjv` as root")
        subprocess.run(["apt-get", "install", "-y", "bible-kjv"], check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(list(BIBLE_COMMAND), check=True, capture_output=True, text=True).stdout
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def fetch_qa_wikidata() -> Path:
    """BIG-bench qa_wikidata task.json (the 358 MB archive is cached under downloads_dir())."""
    path = qa_wikidata_path()
    if path.is_file():
        return path
    archive = _pip_download(BIGBENCH_REQUIREMENT, downloads_dir(), source_only=False)
    _extract_member(archive, QA_WIKIDATA_MEMBER, path)
    return path


def ensure_data() -> dict[str, object]:
    """Fetch whatever is missing; returns the paths by kind."""
    return {"books": fetch_books(), "bible": fetch_bible(), "qa_wikidata": fetch_qa_wikidata()}


def load_qa_examples() -> list[dict]:
    """qa_wikidata examples: [{"input": "The country of X is", "target": str | [str, ...]}, ...]."""
    with open(fetch_qa_wikidata(), encoding="utf-8") as f:
        return json.load(f)["examples"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for kind, paths in ensure_data().items():
        for p in paths if isinstance(paths, list) else [paths]:
            print(f"{kind:12s} {p}  ({p.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
