"""Every Markdown file a tracked file names is in the repository, and no tracked file holds a machine's absolute path.

A reference resolves against the naming file's folder or the repository root (``docs/methods.md`` from anywhere,
a bare name from a file in the same folder). Files that stages *write* (``report.md``) are not references."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITTEN = {"report.md"}  # output file names, not documents
LINK_TEXT = re.compile(r"\[[^\]]*\]\(")  # a Markdown link's text: its target is the reference
MD_REF = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|home|Users|check)/[\w.-]+")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    files = []
    for name in out:
        path = ROOT / name
        if name.startswith("runs/") or path.suffix in {".jsonl", ".png", ".gz"} or not path.is_file():
            continue
        try:
            path.read_text()
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_every_markdown_reference_resolves_to_a_file_in_the_repository():
    missing = []
    for path in _tracked_text_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for ref in MD_REF.findall(LINK_TEXT.sub("(", line)):
                if Path(ref).name in WRITTEN:
                    continue
                if not ((path.parent / ref).is_file() or (ROOT / ref).is_file()):
                    missing.append(f"{path.relative_to(ROOT)}:{i}: {ref}")
    assert not missing, "references to files not in the repository:\n" + "\n".join(missing)


def test_no_absolute_machine_path_in_the_repository():
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in _tracked_text_files()
             if p.name != Path(__file__).name
             for i, line in enumerate(p.read_text().splitlines(), 1) for m in ABSOLUTE.finditer(line)]
    assert not found, "\n".join(found)
