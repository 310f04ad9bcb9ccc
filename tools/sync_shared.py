"""Copy the marked shared blocks of a source script into sibling scripts (or check they have not drifted).

The top-level scripts are self-contained by design; blocks between `# SHARED BEGIN: name` and `# SHARED END: name`
must read word for word the same wherever they appear. Edit the block in one script, then run
    python tools/sync_shared.py pgd_iql.py            # rewrite the same-named blocks of the other scripts
    python tools/sync_shared.py --check               # exit 1 and name the blocks that differ
"""
import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"^[ \t]*# SHARED BEGIN: (\S+)\n.*?^[ \t]*# SHARED END: \1\n", re.S | re.M)


def blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in BLOCK.finditer(text)}


def scripts() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "*.py")))


def drift() -> list[str]:
    """'name: a.py != b.py' for every shared block that differs between two scripts."""
    seen, problems = {}, []
    for path in scripts():
        for name, body in blocks(open(path).read()).items():
            first = seen.setdefault(name, (path, body))
            if first[1] != body:
                problems.append(f"{name}: {os.path.basename(first[0])} != {os.path.basename(path)}")
    return problems


def sync(source: str):
    src = blocks(open(source).read())
    for path in scripts():
        if os.path.abspath(path) == os.path.abspath(source):
            continue
        text = open(path).read()
        new = BLOCK.sub(lambda m: src.get(m.group(1), m.group(0)), text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated {os.path.basename(path)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="script whose blocks are copied into the others")
    parser.add_argument("--check", action="store_true", help="only report drift")
    a = parser.parse_args()
    if a.source and not a.check:
        sync(a.source)
    problems = drift()
    print("\n".join(problems) or "shared blocks identical")
    sys.exit(1 if problems else 0)
