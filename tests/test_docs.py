"""The documents agree with the code: the architecture document's kernel table with
anecy.kernel_layout.KERNELS, its section references with its headings; the README's test
command with what .ci/run runs, its command table with anecy.cli.COMMANDS, its length and
its links; the training flags table with the train parser and TrainConfig; every flag,
default, file path and link the README and docs/*.md name; and docs/python-api.md's
examples, run as written."""
import argparse
import contextlib
import importlib
import io
import os
import re
import runpy
import subprocess
from pathlib import Path

from conftest import require_shared, require_tool

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 150    # the front door: detail lives in docs/


def test_kernel_table_is_generated_from_the_kernel_table_in_code():
    tool = runpy.run_path(str(ROOT / "tools" / "kernel_table.py"))
    table = tool["table"]()
    assert table.count("\n") == 2 + 10       # header, rule, one row per kernel
    assert tool["documented"]() == table, \
        "docs/ARCHITECTURE.md's kernel table is stale: run python tools/kernel_table.py --write"


def test_section_references_name_existing_sections():
    headings = dict(re.findall(r"^## (\d+)\. (.+)$", ARCHITECTURE.read_text(), re.M))
    assert len(headings) >= 10
    cited = []
    sources = [README, *ROOT.glob("*.py"),
               *(p for d in ("anecy", "tests", "bench", "tools", "docs", ".ci")
                 for p in (ROOT / d).rglob("*") if p.is_file())]
    for path in sources:
        if path.suffix not in (".py", ".pyx", ".pxd", ".h", ".m", ".md", ".sh", ""):
            continue
        text = path.read_text(errors="replace")
        # "docs/ARCHITECTURE.md, section 4 (The ten kernels)": the title may wrap
        for num, title in re.findall(r"ARCHITECTURE\.md\]?(?:\([^)]*\))?,?\s+(?:#\s*)?"
                                     r"section\s+(\d+)(?:\s+\(([^)]*)\))?", text):
            cited.append((path.name, num))
            assert num in headings, f"{path}: cites section {num}, which does not exist"
            if title:
                assert " ".join(title.split()) == headings[num], \
                    f"{path}: section {num} is '{headings[num]}', not '{title}'"
    assert cited, "no file cites a section of docs/ARCHITECTURE.md"


def marked_block(path, name):
    """The text between ``<!-- name... -->`` and ``<!-- end of name -->`` in ``path``."""
    m = re.search(rf"<!-- {name}[^>]*-->\n(.*?)<!-- end of {name} -->", path.read_text(), re.S)
    assert m, f"{path.name} has no block marked '{name}'"
    return m.group(1)


def readme_test_command():
    """The fenced block under the README's test-command marker."""
    m = re.fullmatch(r"```bash\n(.*?)```\n", marked_block(README, "test command"), re.S)
    assert m, "README.md's test command block is not one fenced bash block"
    return m.group(1)


def test_ci_runs_the_readme_test_command():
    bash = require_tool("bash", "apt-get install bash", ".ci/run is a bash script")
    shown = subprocess.run([bash, str(ROOT / ".ci" / "run"), "--print-test-command"],
                           capture_output=True, text=True, check=True).stdout
    command = readme_test_command()
    assert shown == command
    # one line a user pastes: a fresh virtual environment, the pinned CPU torch, the test
    # extras, the whole suite
    assert command.count("\n") == 1
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0" in command and command.strip().endswith("pytest -q tests")


# --- the README is an overview: short, status first, everything else a link away ---

def test_readme_is_short_and_says_the_status_on_its_first_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"
    first_screen = " ".join(" ".join(lines[:25]).split())
    assert "never run on a Mac" in first_screen


def table_rows(block):
    """The cells of each body row of the markdown table in ``block``."""
    rows = [line.strip().strip("|").split(" | ") for line in block.splitlines()
            if line.startswith("|")]
    assert len(rows) > 2, "no table"
    return [[cell.strip() for cell in row] for row in rows[2:]]   # past the header and rule


def test_readme_command_table_lists_every_command_once_in_order():
    from anecy.cli import COMMANDS
    rows = table_rows(marked_block(README, "commands"))
    assert [row[0] for row in rows] == [f"`{name}`" for name in COMMANDS]
    for name, row in zip(COMMANDS, rows):
        (link,) = re.findall(r"\]\((docs/[^)#]+)\)", row[-1])
        assert f"anecy {name}" in (ROOT / link).read_text(), \
            f"{link}, linked for `{name}`, does not describe anecy {name}"


def github_anchor(heading):
    """The id GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def test_links_between_documents_resolve():
    linked_from_readme = set()
    for doc in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue                                  # a URL, not a file of the repo
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name} links to {target}, which does not exist"
            if doc == README:
                linked_from_readme.add(file)
            if anchor:
                anchors = {github_anchor(h) for h in
                           re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in anchors, f"{doc.name} links to {target}: no such heading"
    unlinked = [d.name for d in DOCS if d.resolve() not in linked_from_readme]
    assert not unlinked, f"README.md links to no page of docs/ named {unlinked}"


def test_paths_named_in_the_documents_exist():
    for doc in [README, *DOCS]:
        for path in re.findall(r"`((?:anecy|tests|bench|tools)/[\w./-]+)`", doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


# --- the flags the documents describe are the flags the commands take ---

def command_parser(name, **kwargs):
    """The parser of ``anecy name``, built as anecy.cli builds it."""
    module = importlib.import_module(f"anecy.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"anecy {name}")
    module.add_arguments(parser, **kwargs)
    return parser


def options(parser):
    """{option string: its argparse action} of ``parser``, without --help."""
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_training_flags_table_is_the_train_parser():
    from anecy.commands import train
    from anecy.config import TrainConfig
    actions = options(command_parser("train", family="stories"))
    rows = table_rows(marked_block(ROOT / "docs" / "training.md", "train flags"))
    documented = {}
    for flag_cell, _meaning, default in rows:
        m = re.fullmatch(r"`(--[a-z-]+)(?: \{([^}]*)\})?(?: [A-Z]+)?`", flag_cell)
        assert m, f"docs/training.md: flag cell {flag_cell!r} is not `--flag [{{choices}}] [ARG]`"
        flag, choices = m.groups()
        assert flag in actions, f"docs/training.md documents {flag}, which train does not take"
        action = actions[flag]
        assert (choices.split(",") if choices else None) == \
            (list(action.choices) if action.choices else None), f"{flag}: choices"
        documented[flag] = default
    assert set(documented) == set(actions), \
        f"undocumented train flags: {sorted(set(actions) - set(documented))}"

    tc = TrainConfig()
    family = "stories"
    for flag, default in documented.items():
        action = actions[flag]
        if isinstance(action, argparse._StoreTrueAction):
            expected = "off"
        elif flag == "--preset":
            expected = train.FAMILIES[family][1]
        elif flag == "--ckpt":
            expected = f"{family}.ckpt"
        elif flag == "--loss-scale":
            assert tc.loss_scale is None     # None: the backend's own, which `auto` names
            expected = train.AUTO
        elif action.default is not None:
            expected = str(action.default)
        elif getattr(tc, action.dest, None) is not None:
            value = getattr(tc, action.dest)
            assert float(default) == value, f"{flag}: default {value}, documented {default}"
            continue
        else:
            assert default, f"{flag}: no default documented"   # described in words
            continue
        assert default == expected, f"{flag}: default {expected}, documented {default}"


def test_training_text_states_the_configured_optimizer():
    from anecy.config import TrainConfig
    tc = TrainConfig()
    text = " ".join((ROOT / "docs" / "training.md").read_text().split())
    assert f"to `{tc.min_lr_frac} x lr`" in text
    assert f"embeddings ({tc.weight_decay})" in text
    assert f"betas {tc.betas}" in text
    assert f"after {tc.loss_scale_growth} clean updates" in text


# the commands (and benchmark scripts) whose flags each document names
DOC_FLAGS = {
    "README.md": ("train", "prepare", "download", "plot", "sample", "export", "eval",
                  "selftest", "bench"),
    "training.md": ("train",),
    "data.md": ("prepare", "download", "plot", "train"),
    "sampling-and-export.md": ("sample", "export", "train"),
    "ane.md": ("selftest", "bench", "train"),
    "reliability.md": ("train",),
    "python-api.md": (),
    "tracing.md": ("train", "bench/bench_step.py", "bench/bench_ane_host.py"),
    "lora.md": ("train", "sample", "export"),
    "chat.md": ("prepare", "chat", "train", "sample"),
    "gguf.md": ("export", "eval", "prepare"),
    "benchmarks.md": ("bench/bench_step.py", "bench/bench_ane_host.py", "bench/bench_sample.py",
                      "sample"),
    "ARCHITECTURE.md": ("train", "selftest", "tools/kernel_table.py"),
    "distributed.md": ("train", "bench/bench_dp.py"),
}
# "`--top-p P` (0.9, nucleus)", "--seed N (0)", "`--preset {a,b}` (default a)": a flag, its
# choices if listed, and the default given beside it
DEFAULT_BESIDE_FLAG = re.compile(
    r"(--[a-z-]+)(?: \{([^}]*)\}| [A-Z]+)?`?\s+\((?:default )?([\w.-]+)(?:[,;)]| =)")
# other programs' flags: xcode-select, accelerate and torchrun commands, mlx-lm's --num-layers,
# tensorboard's --logdir, mpirun's --hostfile and --oversubscribe
FOREIGN_FLAGS = {"--install", "--num_processes", "--nproc-per-node", "--model", "--num-layers",
                 "--logdir", "--hostfile", "--oversubscribe"}


def command_variants(name):
    """[(parser, {dest: default where the parser leaves it to the command})] of ``name``:
    train's for ``anecy train`` and for each train_<family>.py."""
    if name != "train":
        return [(command_parser(name), {})]
    from anecy.commands import train
    from anecy.config import TrainConfig
    config = TrainConfig().to_dict()                 # train's defaults are TrainConfig's
    return [(command_parser("train", family=family),
             {**config, "preset": presets[1] if presets else None})
            for family, presets in [(None, None), *train.FAMILIES.items()]]


def flag_sources(names):
    """{flag: [(its default, its choices), ...]} over the commands and scripts ``names``."""
    flags = {"--help": [(None, None)]}               # every command's
    for name in names:
        if name.endswith(".py"):
            for flag in re.findall(r"[\"'](--[a-z-]+)[\"']", (ROOT / name).read_text()):
                flags.setdefault(flag, []).append((None, None))
            continue
        for parser, defaults in command_variants(name):
            for flag, action in options(parser).items():
                default = action.default
                if default is None:
                    default = defaults.get(action.dest)
                flags.setdefault(flag, []).append(
                    (default, list(action.choices) if action.choices else None))
    return flags


def test_every_documented_flag_and_default_is_the_commands():
    assert set(DOC_FLAGS) == {p.name for p in [README, *DOCS]}
    for doc in [README, *DOCS]:
        text = doc.read_text()
        known = flag_sources(DOC_FLAGS[doc.name])
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text)) - FOREIGN_FLAGS:
            assert flag in known, f"{doc.name} names {flag}, which " \
                f"{', '.join(DOC_FLAGS[doc.name]) or 'nothing it documents'} does not take"
        for flag, choices, value in DEFAULT_BESIDE_FLAG.findall(text):
            assert any(same_value(value, default) and (not choices or choices.split(",") == offered)
                       for default, offered in known[flag]), \
                f"{doc.name}: {flag} {{{choices}}} ({value}) is none of {known[flag]}"


def same_value(text, value):
    """Whether ``text``, as a document writes it, is ``value``."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        try:
            return float(text) == value
        except ValueError:
            return False
    return text == str(value)


# --- docs/python-api.md's examples run as written ---

def python_example(name):
    block = marked_block(ROOT / "docs" / "python-api.md", f"python example: {name}")
    m = re.fullmatch(r"```python\n(.*?)```\n", block, re.S)
    assert m, f"docs/python-api.md's example '{name}' is not one fenced python block"
    return m.group(1)


def run_example(name, where, monkeypatch):
    code = python_example(name)
    monkeypatch.chdir(where)
    monkeypatch.delenv("ANECY_DATA", raising=False)   # the built-in corpus, not a local file
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/python-api.md ({name})", "exec"), {})
    return out.getvalue()


def test_python_api_training_example_runs(tmp_path, monkeypatch):
    run_example("training", tmp_path, monkeypatch)
    assert os.listdir(tmp_path) == []        # no checkpoint or metrics path: nothing written


def test_python_api_generating_example_runs(tmp_path, monkeypatch):
    from anecy import llama2c
    from anecy.config import ModelConfig
    from anecy.model import Model
    tok = require_shared("data", "llama2-tokenizer", "tokenizer.model",
                         why="the example decodes with Llama 2's tokenizer")
    (tmp_path / "tokenizer.model").symlink_to(tok)
    llama2c.save(Model(ModelConfig.preset("stories15m"), seed=0), tmp_path / "stories15M.bin")
    printed = run_example("generating", tmp_path, monkeypatch)
    assert printed.startswith("Once upon a time")
