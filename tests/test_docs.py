"""The README and docs/ show only commands and options that exist, and links that resolve.

Fast: walks the CLI's click command tree, runs no command and no model.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import typer.main

import medseg.cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250


FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# How a command line may begin: "medseg", "$ medseg", ".venv/bin/medseg", "VAR=value medseg",
# "python -m medseg", "torchrun --nproc_per_node 4 -m medseg".
ENV = r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
PREFIX = re.compile(r"^(?:\$\s+)?" + ENV + r"(?:(?:\S*/)?medseg|\S*(?:python3?|torchrun)\s(?:.*\s)?-m\s+medseg)(?:\s|$)")
PLACEHOLDERS = {"…", "...", "[...]", "[…]"}


def doc_files() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def split_markdown(text: str) -> tuple[list[str], str]:
    """(the lines of every fenced code block, the text outside them)."""
    fenced: list[str] = []
    prose: list[str] = []
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            prose.append("")
            continue
        if fence is not None:
            if m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3).strip():
                fence = None
            else:
                fenced.append(line)
            prose.append("")
            continue
        prose.append(line)
    return fenced, "\n".join(prose)


def join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def command_lines(path: Path) -> list[str]:
    """Every line of a fenced block, and every inline code span, that runs medseg."""
    fenced, prose = split_markdown(path.read_text(encoding="utf-8"))
    found = [line.strip() for line in join_continuations(fenced)]
    found += [" ".join(m.group(2).split()) for m in INLINE.finditer(prose)]
    return [line for line in found if PREFIX.match(line)]


def tokens(line: str) -> list[str]:
    line = line.replace("\\\n", " ")
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
    except ValueError:  # an unbalanced quote in a sketch: fall back to whitespace
        words = line.split("#", 1)[0].split()
    if words and words[0] == "$":
        words = words[1:]
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value
        words = words[1:]
    # drop the program: medseg, .venv/bin/medseg, python -m medseg, torchrun … -m medseg
    if words and (words[0] == "medseg" or words[0].endswith("/medseg")):
        words = words[1:]
    else:
        starts = [i + 2 for i in range(len(words) - 1) if words[i] == "-m" and words[i + 1] == "medseg"]
        words = words[starts[0]:] if starts else []
    # a pipe or a shell list ends the medseg command
    for i, w in enumerate(words):
        if w in {"|", "&&", "||", ";", ">", "2>", ">>"}:
            return words[:i]
    return words


def is_placeholder(word: str) -> bool:
    """'…', '...', '<command>', or a bracketed usage word such as '[OPTIONS]'."""
    if word.startswith("[") and not option_word(word):
        return True
    w = word.strip("[]")
    return w in PLACEHOLDERS or bool(re.fullmatch(r"<[^<>]+>", w))


def option_word(word: str) -> list[str]:
    """The option names a word stands for ('[--model', '--tta/--no-tta', '--set=a=b'), or []."""
    w = word.lstrip("[").rstrip("]").rstrip(",")
    if not w.startswith("-") or w in {"-", "--"} or re.fullmatch(r"-[\d.]+", w):
        return []
    names = []
    for part in w.split("/"):
        part = part.split("=", 1)[0].rstrip("…").rstrip(".")
        if part.startswith("-"):
            names.append(part)
    return names


def context(cmd, name, parent):
    return cmd.context_class(cmd, info_name=name, parent=parent, **cmd.context_settings)


ROOT_COMMAND = typer.main.get_command(medseg.cli.app)


def params(cmd, ctx) -> dict[str, object]:
    names = {}
    for p in cmd.get_params(ctx):
        if p.param_type_name == "option":
            for o in list(p.opts) + list(p.secondary_opts):
                names[o] = p
    return names


def check_command(words: list[str]) -> list[str]:
    """Problems with one medseg command line (empty when it is valid)."""
    cmd, ctx, path = ROOT_COMMAND, context(ROOT_COMMAND, "medseg", None), ["medseg"]
    i = 0
    while getattr(cmd, "commands", None) and i < len(words):
        w = words[i]
        if option_word(w):
            break
        if is_placeholder(w):
            return []  # "medseg <command> --help": nothing definite to check
        sub = cmd.commands.get(w)
        if sub is None:
            return [f"'{' '.join(path)}' has no subcommand {w!r} (has: {', '.join(cmd.commands)})"]
        cmd, ctx, path = sub, context(sub, w, ctx), path + [w]
        i += 1
    known = params(cmd, ctx)
    problems = []
    skip_value = False
    for w in words[i:]:
        if skip_value:
            skip_value = False
            continue
        for name in option_word(w):
            p = known.get(name)
            if p is None:
                problems.append(f"'{' '.join(path)}' has no option {name!r}")
            elif not p.is_flag and "=" not in w:
                skip_value = True
    return problems


def all_command_lines() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), line) for p in doc_files() for line in command_lines(p)]


def test_docs_exist():
    assert README.is_file()
    pages = {p.name for p in DOCS.glob("*.md")}
    for name in ["README.md", "cli.md", "predict.md", "configs.md", "training.md", "dicom.md", "batch-and-pacs.md",
                 "models.md", "2d.md", "slicer.md", "safety.md", "python-api.md", "benchmarks.md",
                 "data-licences.md"]:
        assert name in pages, f"docs/{name} is missing"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it to {MAX_README_LINES} and move detail to docs/"


def test_docs_show_commands():
    lines = all_command_lines()
    # the front door shows how to segment, batch and train
    readme = [line for f, line in lines if f == "README.md"]
    for sub in ["predict", "batch", "train", "plan"]:
        assert any(tokens(line)[:1] == [sub] for line in readme), f"README.md shows no 'medseg {sub}'"
    assert len(lines) > 50


def test_every_shown_command_and_option_exists():
    problems = []
    for where, line in all_command_lines():
        for problem in check_command(tokens(line)):
            problems.append(f"{where}: `{line}`: {problem}")
    assert not problems, "\n".join(problems)


def test_cli_reference_lists_every_command_and_option():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ `(medseg[^`]*)`", text, re.M))
    missing = []

    def walk(cmd, path, parent):
        ctx = context(cmd, path[-1], parent)
        if len(path) > 1:
            name = " ".join(path)
            if name not in headings:
                missing.append(f"no heading for `{name}`")
            else:
                section = text.split(f"`{name}`\n", 1)[1].split("\n#", 1)[0]
                for opt in params(cmd, ctx):
                    if f"`{opt}`" not in section:
                        missing.append(f"`{name}`: option {opt} not listed")
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [sub_name], ctx)

    walk(ROOT_COMMAND, ["medseg"], None)
    assert not missing, "docs/cli.md is out of date (regenerate it from --help):\n" + "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    out |= set(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", prose))
    return out


def test_relative_links_resolve():
    problems = []
    for page in doc_files():
        _, prose = split_markdown(page.read_text(encoding="utf-8"))
        prose = INLINE.sub("", prose)
        for m in LINK.finditer(prose):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: {rel} does not exist")
                continue
            if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                problems.append(f"{where}: no heading #{fragment} in {rel}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, bad", [
    ("medseg predict scans/ -o out/ --bogus-option 3", "--bogus-option"),
    ("medseg predikt scans/ -o out/", "predikt"),
    ("medseg pacs predict --url http://x --study 1 --outputs x", "--outputs"),
    ("$ medseg batch ROOT -o OUT [--shard I/N] [--no-retry-failed] [--frobnicate]", "--frobnicate"),
    ("medseg train configs/hippocampus.yaml \\\n    --set a=b --foldz 5", "--foldz"),
    ("MEDSEG_DATA=/data medseg train configs/hippocampus.yaml --epochs 3", "--epochs"),
    ("torchrun --nproc_per_node 4 -m medseg train configs/hippocampus.yaml --gpus 4", "--gpus"),
])
def test_checker_catches_bad_commands(line, bad):
    problems = check_command(tokens(line))
    assert problems and bad in problems[0]


@pytest.mark.parametrize("line", [
    "medseg predict … --stats csv",
    "medseg predict case.nii.gz -o out/ --tta/--no-tta -m hippocampus-fast",
    "medseg pack-model A.pt B.pt OUT.pt --int8 --set inference.overlap=0.25",
    "medseg batch --from-dicomweb http://pacs/dicom-web --query ModalitiesInStudy=MR -o out/",
    "medseg <command> --help",
    ".venv/bin/medseg --help",
    "python -m medseg train configs/hippocampus.yaml --folds 5 --fold 0",
    "torchrun --nproc_per_node 4 -m medseg train configs/hippocampus.yaml",
    "MEDSEG_DATA=/data medseg train configs/hippocampus.yaml --set data.root=/x",
    "medseg train configs/hippocampus.yaml --set 'patch.size=[40,56,40]'   # a comment --not-an-option",
])
def test_checker_accepts_good_commands(line):
    assert check_command(tokens(line)) == []
