"""The repository is Apache-2.0 licensed, says so in its metadata, and its wheel carries the text."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MD5 of https://www.apache.org/licenses/LICENSE-2.0.txt, the canonical text, byte for byte
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def test_license_file_is_the_full_apache_2_0_text():
    with open(os.path.join(REPO, "LICENSE"), "rb") as f:
        text = f.read()
    for part in (b"Apache License", b"Version 2.0, January 2004", b"TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                 b"9. Accepting Warranty or Additional Liability.", b"END OF TERMS AND CONDITIONS",
                 b"APPENDIX: How to apply the Apache License to your work."):
        assert part in text, part
    assert hashlib.md5(text).hexdigest() == APACHE_2_0_MD5


def test_pyproject_declares_the_license_and_its_file():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639), not the deprecated table
    assert project["license-files"] == ["LICENSE"]


def test_wheel_carries_the_license(tmp_path):
    """Build the wheel from a copy of the tracked files (a few seconds, no network: the installed
    setuptools, no build isolation)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    src = tmp_path / "src"
    for rel in listed:
        if os.path.isfile(os.path.join(REPO, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "pkm_bert-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        with open(os.path.join(REPO, "LICENSE"), "rb") as f:
            assert z.read(license_name) == f.read()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "pkm/remote_code.py" in names  # the generator ships, so installed packages write remote code
