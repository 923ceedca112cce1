"""Point the book, the notebooks and the README at the repository the labs are published from, and at
the release (a tag) or branch that courses use.

    python3 scripts/set_repository.py https://github.com/my-org/kd-course --branch main
    python3 scripts/set_repository.py --tag v0.2.0   # pin a release: the install lines and badges name it
    python3 scripts/set_repository.py --check     # list every link that disagrees with _config.yml

The address lives in one setting, ``repository.url`` and ``repository.branch`` in ``kdbook/_config.yml``
(``branch`` may name a tag: the project's own links name its release tag, ``v`` + the package version,
so that a commit pushed to ``main`` mid-term changes no student's lab; ``--tag`` is another name for
``--branch``):
the book's launch buttons (Binder, Colab) and its repository button are built from it. Copies of the
address also sit where no build step can fill them in: the Colab and Binder badges in the README and in
the notebooks, and the Colab install line in each notebook's first code cell
(``%pip install "kdbook-utils @ git+https://github.com/OWNER/NAME@BRANCH"``). This script writes the new
address and branch into ``_config.yml`` and rewrites every one of those copies to match; ``--check``
changes nothing and exits with status 1 when any copy disagrees with ``_config.yml``.

What counts as a copy (anywhere in ``README.md``, ``kdbook/**/*.md`` and ``notebooks/*.ipynb``):

* a Colab link ``https://colab.research.google.com/github/OWNER/NAME/blob/BRANCH/...``;
* a Binder link ``https://<binderhub>/v2/gh/OWNER/NAME/BRANCH...``;
* the package install ``git+https://github.com/OWNER/NAME[@REF]`` (always rewritten with ``@BRANCH``);
* a plain ``https://github.com/OWNER/NAME`` link to the configured repository (its ``blob/BRANCH`` or
  ``tree/BRANCH`` part follows the branch). Links to other repositories are left alone.

Files are edited as text, so a notebook's JSON layout and everything else in it stay byte for byte.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path("kdbook") / "_config.yml"

OWNER_NAME = r"[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9_.-]+"
BRANCH = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
REPOSITORY_URL = re.compile(rf"^https://github\.com/({OWNER_NAME})$")
BRANCH_NAME = re.compile(rf"^{BRANCH}$")

# One pattern with a named group per kind of copy, so that each location is matched exactly once.
LINKS = re.compile(
    rf"(?P<colab>https://colab\.research\.google\.com/github/(?P<colab_repo>{OWNER_NAME})"
    rf"/blob/(?P<colab_branch>{BRANCH})/)"
    rf"|(?P<binder>(?P<binder_host>https://[A-Za-z0-9.:-]+)/v2/gh/(?P<binder_repo>{OWNER_NAME})"
    rf"/(?P<binder_branch>{BRANCH}))"
    rf"|(?P<pip>git\+https://github\.com/(?P<pip_repo>{OWNER_NAME}?)(?:\.git)?(?:@(?P<pip_ref>{BRANCH}))?"
    r"(?![A-Za-z0-9_./-]))"
)


@dataclass(frozen=True)
class Repository:
    """The repository address and branch that every link should name."""

    url: str
    branch: str

    @property
    def owner_name(self) -> str:
        return self.url.removeprefix("https://github.com/")


@dataclass(frozen=True)
class Disagreement:
    path: Path
    line: int
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.found}  (expected {self.expected})"


def parse_repository(url: str, branch: str) -> Repository:
    """Validate a GitHub address and a branch name; raise ``ValueError`` naming the bad value and the fix."""
    url = url.strip().rstrip("/").removesuffix(".git")
    if not REPOSITORY_URL.match(url):
        raise ValueError(
            f"repository address {url!r} is not of the form https://github.com/OWNER/NAME. Binder's and "
            "Colab's launch links open repositories on github.com; give the address as it appears in the "
            "browser, e.g. https://github.com/my-org/kd-course."
        )
    if not BRANCH_NAME.match(branch):
        raise ValueError(
            f"branch {branch!r} is not supported: use letters, digits, '.', '_' and '-' only (Binder and "
            "Colab links cannot name a branch with '/' unescaped), e.g. --branch main."
        )
    return Repository(url, branch)


def _repository_block(text: str) -> re.Match[str]:
    """The indented lines under the top-level ``repository:`` key of ``_config.yml``."""
    block = re.search(r"^repository:[ \t]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", text, flags=re.MULTILINE)
    if block is None:
        raise ValueError(f"{CONFIG} has no top-level 'repository:' block")
    return block


def configured_repository(root: Path = ROOT) -> Repository:
    """The address and branch in ``kdbook/_config.yml`` (read without a YAML library: this script runs
    with any Python 3.9+)."""
    body = _repository_block((root / CONFIG).read_text()).group(1)
    values = {}
    for key in ("url", "branch"):
        found = re.search(rf"^[ \t]+{key}:[ \t]*([^\n#]*?)[ \t]*(?:#[^\n]*)?$", body, flags=re.MULTILINE)
        if found is None:
            raise ValueError(f"{CONFIG} needs repository.{key}")
        values[key] = found.group(1).strip("'\"")
    return parse_repository(values["url"], values["branch"])


def files_with_links(root: Path = ROOT) -> list[Path]:
    """README.md, the book's Markdown pages and the notebooks (built and executed copies excluded)."""
    book_pages = [
        path
        for path in sorted((root / "kdbook").rglob("*.md"))
        if not {"_build", "lessons"} & set(path.relative_to(root / "kdbook").parts)
    ]
    return [root / "README.md", *book_pages, *sorted((root / "notebooks").glob("*.ipynb"))]


def _own_github_links(repository: Repository) -> re.Pattern[str]:
    """Plain links to this repository (not the ``git+`` install line), with an optional blob/tree branch."""
    return re.compile(
        rf"(?<!git\+)https://github\.com/{re.escape(repository.owner_name)}"
        rf"(?:/(?P<kind>blob|tree)/(?P<branch>{BRANCH}))?(?![A-Za-z0-9_.-])"
    )


def _expected(match: re.Match[str], repository: Repository) -> str:
    owner_name, branch = repository.owner_name, repository.branch
    if match["colab"]:
        return f"https://colab.research.google.com/github/{owner_name}/blob/{branch}/"
    if match["binder"]:
        return f"{match['binder_host']}/v2/gh/{owner_name}/{branch}"
    return f"git+https://github.com/{owner_name}@{branch}"


def _expected_own(match: re.Match[str], new: Repository) -> str:
    if match["kind"]:
        return f"{new.url}/{match['kind']}/{new.branch}"
    return new.url


def find_disagreements(root: Path = ROOT) -> list[Disagreement]:
    """Every launch link or install line that does not name ``_config.yml``'s repository and branch."""
    repository = configured_repository(root)
    own = _own_github_links(repository)
    found: list[Disagreement] = []
    for path in files_with_links(root):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in LINKS.finditer(line):
                expected = _expected(match, repository)
                if match.group(0) != expected:
                    found.append(Disagreement(path.relative_to(root), number, match.group(0), expected))
            for match in own.finditer(line):
                if match["kind"] and match["branch"] != repository.branch:
                    expected = _expected_own(match, repository)
                    found.append(Disagreement(path.relative_to(root), number, match.group(0), expected))
    return found


def count_links(root: Path = ROOT) -> dict[Path, int]:
    """How many launch links and install lines each file holds (for the summary and the tests)."""
    return {path.relative_to(root): len(LINKS.findall(path.read_text())) for path in files_with_links(root)}


def rewrite_text(text: str, old: Repository, new: Repository) -> str:
    """``text`` with every launch link and install line naming ``new``, and links to ``old`` moved."""
    text = LINKS.sub(lambda match: _expected(match, new), text)
    return _own_github_links(old).sub(lambda match: _expected_own(match, new), text)


def rewrite_config(text: str, new: Repository) -> str:
    """``_config.yml``'s text with ``repository.url`` and ``repository.branch`` replaced, comments kept."""
    block = _repository_block(text)
    body = block.group(1)
    for key, value in (("url", new.url), ("branch", new.branch)):
        body, replaced = re.subn(
            rf"^([ \t]+{key}:[ \t]*)[^\n#]*?([ \t]*(?:#[^\n]*)?)$", rf"\g<1>{value}\g<2>", body, count=1,
            flags=re.MULTILINE,
        )  # fmt: skip
        if not replaced:
            raise ValueError(f"kdbook/_config.yml's repository block has no '{key}:' line")
    return text[: block.start(1)] + body + text[block.end(1) :]


def set_repository(new: Repository, root: Path = ROOT) -> list[Path]:
    """Write ``new`` into ``_config.yml`` and every copy of the address; return the files changed."""
    old = configured_repository(root)
    changed: list[Path] = []
    config = root / CONFIG
    for path, rewrite in [(config, lambda text: rewrite_config(text, new))] + [
        (path, lambda text: rewrite_text(text, old, new)) for path in files_with_links(root)
    ]:
        text = path.read_text()
        updated = rewrite(text)
        if updated != text:
            path.write_text(updated)
            changed.append(path.relative_to(root))
    return changed


def _report(disagreements: list[Disagreement]) -> Iterator[str]:
    yield f"{len(disagreements)} link(s) disagree with {CONFIG}:"
    for disagreement in disagreements:
        yield f"  {disagreement}"
    yield "Fix them with: python3 scripts/set_repository.py <url> --branch <branch>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", help="the new address, https://github.com/OWNER/NAME")
    parser.add_argument(
        "--branch", "--tag", dest="branch", default=None,
        help="the branch or release tag to publish from, e.g. v0.2.0 (default: unchanged)",
    )  # fmt: skip
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any link disagrees")
    args = parser.parse_args(argv)
    try:
        current = configured_repository()
        if args.check:
            if args.url or args.branch:
                parser.error("--check takes no address or branch: it compares the files with _config.yml")
            disagreements = find_disagreements()
            if disagreements:
                print("\n".join(_report(disagreements)), file=sys.stderr)
                return 1
            print(f"every link names {current.url} (branch {current.branch})")
            return 0
        if not args.url and not args.branch:
            parser.error("give the new address (and --branch), or --check")
        new = parse_repository(args.url or current.url, args.branch or current.branch)
    except ValueError as error:
        print(f"set_repository: {error}", file=sys.stderr)
        return 2
    changed = set_repository(new)
    print(f"repository: {new.url} (branch {new.branch}); {len(changed)} file(s) changed")
    for path in changed:
        print(f"  {path}")
    left = find_disagreements()
    if left:
        print("\n".join(_report(left)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
