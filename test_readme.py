"""The README as a reader meets it: short, the training step early, every paper-to-code reference pointing
at the code it names, links into REFERENCE.md that land on a heading, and no pointer outside the repository."""
import re
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
README = (HERE / "README.md").read_text()
REFERENCE = (HERE / "REFERENCE.md").read_text()
# a reference is `file.py:LINE` followed by the name it points at: `tl_align.py:51` `cutmix`,
# `vit.py:265` `VisionTransformer.forward` (a method: its class must be defined above it)
REF = re.compile(r"`([\w/]+\.py):(\d+)` `([A-Za-z_][\w.]*)`")


def references():
    return [(doc, *m.groups()) for doc, text in (("README.md", README), ("REFERENCE.md", REFERENCE))
            for m in REF.finditer(text)]


def defines(line: str, name: str) -> bool:
    """Whether a source line defines name: `def name`, `class name` or `name =` (at any indentation)."""
    return re.match(rf"\s*(?:(?:async\s+)?def|class)\s+{re.escape(name)}\b|\s*{re.escape(name)}\s*(?::[^=]*)?=(?!=)",
                    line) is not None


def test_readme_is_short_and_the_training_step_comes_early():
    lines = README.splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; at most 260 (details go to REFERENCE.md)"
    heading = next(i for i, line in enumerate(lines) if line.strip() == "## The training step")
    fence = next(i for i in range(heading, len(lines)) if lines[i].startswith("```python"))
    assert fence < 120, f"the training step's code starts at README.md line {fence + 1}; it must be within 120"
    assert not any(line.startswith("## ") for line in lines[heading + 1:fence]), "the code must follow its heading"


def test_the_guide_has_references():
    assert len(references()) >= 15  # the reading guide: one or more per paper item


@pytest.mark.parametrize("doc, path, line, name", references(), ids=lambda v: str(v))
def test_a_reference_points_at_the_line_that_defines_its_name(doc, path, line, name):
    source = HERE / path
    assert source.is_file(), f"{doc}: `{path}:{line}` `{name}`: {path} does not exist"
    lines = source.read_text().splitlines()
    n = int(line)
    assert 1 <= n <= len(lines), f"{doc}: `{path}:{line}` is past the end of {path} ({len(lines)} lines)"
    *owner, leaf = name.split(".")
    found = [i + 1 for i, text in enumerate(lines) if defines(text, leaf)]
    assert defines(lines[n - 1], leaf), (f"{doc}: `{path}:{line}` `{name}`: line {n} is {lines[n - 1].strip()!r}; "
                                         f"{leaf} is defined at {path}:{found or 'nowhere'}")
    if owner:  # the nearest class opened above the method is the one named
        classes = [m.group(1) for text in lines[:n - 1] if (m := re.match(r"class\s+(\w+)", text))]
        assert classes and classes[-1] == owner[-1], f"{doc}: `{path}:{line}` is not inside class {owner[-1]}"


def test_defines_recognises_definitions_only():
    assert defines("def cutmix(x, patch_size):", "cutmix") and defines("class Block(nn.Module):", "Block")
    assert defines("    def forward(self, x):", "forward") and defines("PRESETS = {", "PRESETS")
    assert defines("GHOST_WEIGHT: float = 0.1", "GHOST_WEIGHT")
    assert not defines("    x = cutmix(x)", "cutmix") and not defines("def cutmix_truth(x):", "cutmix")
    assert not defines("cutmix == 1", "cutmix") and not defines("# def cutmix", "cutmix")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (letters, digits, spaces, - and _ kept),
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_rule():
    assert github_anchor("On a CPU: bf16 and torch.compile") == "on-a-cpu-bf16-and-torchcompile"
    assert github_anchor("track.py: supported models, exactness, cost") == "trackpy-supported-models-exactness-cost"
    assert github_anchor("Evidence: the targets side by side on Fashion-MNIST") == \
        "evidence-the-targets-side-by-side-on-fashion-mnist"


def test_links_into_reference_md_name_its_headings():
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", REFERENCE, flags=re.S), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    links = re.findall(r"\(REFERENCE\.md#([^)\s]+)\)", README)
    inner = re.findall(r"\]\(#([^)\s]+)\)", REFERENCE)  # REFERENCE.md's links to its own sections
    assert links, "README.md links no section of REFERENCE.md"
    missing = sorted({a for a in links + inner if a not in anchors})
    assert not missing, f"links to REFERENCE.md sections that do not exist: {missing}; its anchors: {sorted(anchors)}"


def test_no_file_points_outside_the_repository():
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True).stdout
        files = [HERE / f for f in tracked.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file here
        files = [p for p in HERE.rglob("*") if p.is_file() and ".git" not in p.parts]
    # written split so that this file does not name them itself
    banned = ["PAPER" + ".md", "STYLE" + ".md", "../" + "shared"]
    hits = []
    for path in files:
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="ignore")
            hits += [f"{path.relative_to(HERE)}: {word}" for word in banned if word in text]
    assert not hits, f"files that point at notes outside the repository: {hits}"


def code_blocks(text):
    """The ```python blocks of a markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_training_step_is_the_code_train_py_runs():
    import ast
    import inspect

    import train
    source = inspect.getsource(train.train_step).splitlines()
    doc = ast.parse("\n".join(source)).body[0].body[0]  # the docstring, which the README leaves out
    lines = README.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.strip() == "## The training step")
    shown = code_blocks("\n".join(lines[heading:]))[0].rstrip("\n").splitlines()
    assert shown == source[:doc.lineno - 1] + source[doc.end_lineno:], \
        "README's training step differs from train.train_step: paste the function again (without its docstring)"


def copy_paste_cases():
    """(heading, files, snippet) of each use the README names: its files in the heading, its python blocks."""
    section = README.split("## Using TL-Align in your own loop", 1)[1].split("\n## ", 1)[0]
    cases = []
    for part in section.split("\n### ")[1:]:
        heading = part.splitlines()[0]
        files = re.findall(r"`(\w+\.py)`", heading)
        for i, snippet in enumerate(code_blocks(part)):
            cases.append((f"{heading.split(':')[0]} #{i + 1}", files, snippet))
    return cases


def test_the_readme_names_files_for_each_use():
    names = {tuple(files) for _, files, _ in copy_paste_cases()}
    assert names == {("tl_align.py",), ("vit.py", "tl_align.py"), ("tl_align.py", "track.py")}, names


@pytest.mark.parametrize("case", copy_paste_cases(), ids=lambda c: c[0])
def test_each_snippet_runs_with_only_its_files_copied(tmp_path, case):
    """Copied as the README says, into an empty folder, each snippet runs: no other file of this repository
    is needed (a file that helps with other libraries' models needs only tl_align.py)."""
    import shutil
    import sys
    _, files, snippet = case
    for name in files:
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "snippet.py").write_text(snippet)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_evidence_quotes_results_md():
    """Every interval the README's and REFERENCE.md's evidence quote ('+2.72 points (95% interval ±1.82)',
    '+1.49 ± 1.41') is a paired difference results.md reports, so that the text follows the records."""
    results = (HERE / "results.md").read_text()
    reported = set(re.findall(r"([+-]\d+\.\d\d) ± (\d+\.\d\d)", results))
    evidence = README[README.index("## Evidence"):README.index("## Training")]
    evidence += REFERENCE[REFERENCE.index("## Evidence"):]
    evidence = evidence.replace("−", "-")
    quoted = set(re.findall(r"([+-]\d+\.\d\d) points \(95% interval ±(\d+\.\d\d)\)", evidence))
    quoted |= set(re.findall(r"([+-]\d+\.\d\d) \(±(\d+\.\d\d)\)", evidence))
    quoted |= set(re.findall(r"\*\*([+-]\d+\.\d\d) ± (\d+\.\d\d)\*\*", evidence))
    assert len(quoted) >= 2, "the evidence quotes no interval"
    assert quoted <= reported, f"quoted but not in results.md: {sorted(quoted - reported)}"
    # the shares of the oracle's gain: '+0.48 [+0.09, +0.91]' as results.md has '+0.48, 95% interval [...]'
    shares = set(re.findall(r"([+-]\d+\.\d\d),? (?:95% interval )?\[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]", evidence))
    assert shares, "the evidence quotes no share of the oracle's gain"
    assert shares <= set(re.findall(r"([+-]\d+\.\d\d), 95% interval \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]",
                                    results.replace("−", "-"))), "a share quoted but not in results.md"


def test_links_to_files_of_the_repository_land_on_files():
    """README.md's, REFERENCE.md's and results.md's links and images to files here (figures, results.md) exist."""
    for doc in ("README.md", "REFERENCE.md", "results.md"):
        text = re.sub(r"```.*?```", "", (HERE / doc).read_text(), flags=re.S)
        targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
        missing = [t for t in targets if t and not (HERE / t).exists()]
        assert not missing, f"{doc} links to files that do not exist: {missing}"
