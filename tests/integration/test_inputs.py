"""file:// vetting on a real directory tree: the kernel-resolved fast path decides exactly as pathlib did."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from eventflow.inputs import InputRejected, _kernel_realpath, vet_href
from eventflow.settings import NdviSettings


def pathlib_verdict(href: str, roots: list[Path]) -> bool:
    """The vetting of file:// paths before the fast path (eventflow.inputs at 1c41f1d): accepted or not."""
    raw = unquote(urlsplit(href).path)
    if ".." in Path(raw).parts or not Path(raw).is_absolute():
        return False
    resolved = Path(raw).resolve()
    return any(resolved.is_relative_to(root) for root in roots)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/ (the data root) and outside/, with files, directories and symlinks both ways."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (tmp_path / "rootx").mkdir()  # shares root's name as a string prefix
    for path in (root / "a.tif", root / "sub" / "b.tif", outside / "secret.tif", tmp_path / "rootx" / "c.tif"):
        path.write_bytes(b"x")
    os.symlink(outside / "secret.tif", root / "escape.tif")
    os.symlink(root / "a.tif", root / "inside-link.tif")
    os.symlink(outside, root / "outdir")
    os.symlink(root / "sub", root / "subdir-link")
    os.symlink(root / "missing-target.tif", root / "dangling.tif")
    os.symlink(root, tmp_path / "root-alias")
    return root.resolve(), outside.resolve()


SUFFIXES = ["a.tif", "sub/b.tif", "sub", "", "escape.tif", "inside-link.tif", "outdir/secret.tif", "outdir",
            "subdir-link/b.tif", "dangling.tif", "nothing-here.tif", "sub/", "./a.tif", "sub/./b.tif", "sub//b.tif",
            "../outside/secret.tif", "a.tif/", "%61.tif", "sub%2Fb.tif", "a.tif%00", "a.tif\x00"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_fast_vetting_agrees_with_pathlib(tree: tuple[Path, Path], suffix: str) -> None:
    root, _ = tree
    settings = NdviSettings(data_roots=[root])
    bases = [f"file://{root}/", f"file://{root.parent}/root-alias/", f"file://{root.parent}/rootx/",
             f"file:///{root}/", f"file://localhost{root}/"]
    for href in (base + suffix for base in bases):
        try:
            vet_href("inputs.href", href, settings)
            accepted = True
        except InputRejected:
            accepted = False
        if "\x00" in unquote(href):
            assert not accepted, href  # was a ValueError (a 500); now a 422 naming the field
            continue
        assert accepted == pathlib_verdict(href, settings.data_roots), href


def test_symlinks_out_of_the_root_are_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    settings = NdviSettings(data_roots=[root])
    vet_href("inputs.href", (root / "inside-link.tif").as_uri(), settings)
    if sys.platform == "linux":  # the fast path is taken, and sees through links
        assert _kernel_realpath(str(root / "a.tif")) == str(root / "a.tif")
        assert _kernel_realpath(str(root / "escape.tif")) == str(outside / "secret.tif")
    for path in (root / "escape.tif", root / "outdir" / "secret.tif", outside / "secret.tif"):
        with pytest.raises(InputRejected, match="not under a configured data root"):
            vet_href("inputs.href", path.as_uri(), settings)


def test_the_filesystem_root_as_data_root(tree: tuple[Path, Path]) -> None:
    _, outside = tree
    vet_href("inputs.href", (outside / "secret.tif").as_uri(), NdviSettings(data_roots=[Path("/")]))
