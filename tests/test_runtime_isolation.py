"""The runtime never needs torch or transformers: checked statically and by running it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
FORBIDDEN = {"torch", "transformers", "onnx", "optimum", "torchvision"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_runtime_sources_import_no_heavy_frameworks():
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        bad |= {m for m in imported_modules(path) if m.startswith("edgecap.export")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'onnx', 'optimum'}:
            raise ImportError('blocked by test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_captioning_works_with_torch_and_transformers_blocked(tiny_export, flickr_images):
    script = BLOCKER + f"""
import json
from edgecap import Captioner
from edgecap.cli.main import main
captioner = Captioner({str(tiny_export)!r})
greedy = captioner.caption({str(flickr_images[0])!r})
beam = captioner.caption([{str(flickr_images[1])!r}], num_beams=3)[0]
code = main(['caption', {str(flickr_images[2])!r}, '--model', {str(tiny_export)!r}, '--json'])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'transformers', 'onnx'}})
print(json.dumps({{'greedy': greedy.token_ids, 'beam': beam.token_ids, 'code': code,
                  'loaded': loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    cli_line = json.loads(proc.stdout.strip().splitlines()[-2])
    assert report["code"] == 0
    assert report["loaded"] == []
    assert report["greedy"] and report["beam"]
    assert cli_line["status"] == "ok" and cli_line["generated_text"]
