"""File names that come from users (node widgets, LORA_STACK entries, the HTTP API) -> paths inside one folder.

Every input that names a file to read or write goes through here, so the rules are the same everywhere:

* a name is relative to its folder: absolute paths, drive letters, `..` components, NUL bytes and control
  characters are refused with one message naming the value and the allowed folder;
* the normalised result must lie inside the folder (checked on the absolute, normalised path: a symbolic link
  that an administrator put *inside* the folder is followed, which is how people link model folders from other
  disks; nothing a client sends can name a path outside);
* names longer than the file system allows are refused up front (before hours of training, not after), counting
  the longest suffix the caller will add;
* for reads, "not there", "outside the folder" and "not a file" give the same text, so an error never tells a
  client which files exist elsewhere on the server.

Pure standard library; ComfyUI's folder lists are passed in by nodes/.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

from .errors import LoraFileError, LoraValueError

# One path component: 255 bytes on ext4, NTFS, APFS and most others.
MAX_COMPONENT_BYTES = 255
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_WINDOWS_RESERVED = re.compile(r'[<>:"|?*]')


def _clean_relative(name: str, what: str, folder: str) -> str:
    """`name` as a normalised relative path with '/' separators, or LoraValueError."""
    if not isinstance(name, str):
        raise LoraValueError(f"{what} must be a string, got {type(name).__name__}.")
    text = name.strip().replace("\\", "/")
    shown = repr(name[:120] + ("..." if len(name) > 120 else ""))
    if _BAD_CHARS.search(text):
        raise LoraValueError(f"{what} {shown} is not a usable file name: it contains a NUL or control character; use a plain file name "
                             f"relative to {folder}.")
    if not text or text.endswith("/"):
        raise LoraValueError(f"{what} {shown} is not a usable file name: it is empty or ends with a separator; type a file name such as "
                             f"'my_lora' (relative to {folder}).")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or text.startswith("~"):
        raise LoraValueError(f"{what} {shown} is not a usable file name: it is an absolute path; only names inside {folder} are allowed "
                             f"(subfolders such as 'styles/my_lora' are fine).")
    parts = text.split("/")
    if any(part in ("..",) for part in parts):
        raise LoraValueError(f"{what} {shown} is not a usable file name: it points outside {folder} ('..' is not allowed); use a name or a "
                             f"subfolder path inside it.")
    if _WINDOWS_RESERVED.search(text):
        raise LoraValueError(f"{what} {shown} is not a usable file name: it contains one of < > : \" | ? *, which file systems refuse; use "
                             f"letters, digits, '-', '_', '.', spaces and '/' for subfolders.")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise LoraValueError(f"{what} {shown} is not a usable file name: it names no file; type a file name such as 'my_lora'.")
    return "/".join(parts)


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives on Windows
        return False


def output_path(folder: str, name: str, extension: str = ".safetensors", *, what: str = "output name",
                longest_suffix: str = "") -> str:
    """Absolute path of the file `name` (+ `extension` unless it already ends with it) inside `folder`.

    `longest_suffix` is the longest text the caller will append to the stem (e.g. "-step00000100.safetensors"
    for training step files): the length check covers it too. The folder must exist; subfolders of the result
    are not created here."""
    root = os.path.abspath(folder)
    relative = _clean_relative(name, what, root)
    if extension and not relative.lower().endswith(extension.lower()):
        relative += extension
    stem = relative[: -len(extension)] if extension and relative.lower().endswith(extension.lower()) else relative
    for part in stem.split("/")[:-1] + [stem.split("/")[-1] + (longest_suffix or extension)]:
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise LoraValueError(f"{what} {name[:60]!r}... is not a usable file name: it is too long: the file name {part[:40]!r}... would have "
                                 f"{len(part.encode('utf-8'))} bytes, file systems allow {MAX_COMPONENT_BYTES}. "
                                 f"Use a shorter name.")
    path = os.path.normpath(os.path.join(root, relative))
    if not _inside(path, root):
        raise LoraValueError(f"{what} {name!r} points outside {root}; use a name or a subfolder path inside it.")
    return path


def existing_file(folders: Sequence[str], name: str, *, what: str = "file", label: str = "",
                  extensions: Optional[Iterable[str]] = None) -> str:
    """The file `name` inside one of `folders` (ComfyUI's folder list for a kind, extra paths included).

    `name` may be relative to a folder or an absolute path that lies inside one of them (other packs' stack
    nodes pass full paths). `label` names the folder kind for users ("models/loras"). Every failure - not there, outside every folder, a directory, a FIFO - raises the
    same LoraFileError text."""
    roots = [os.path.abspath(f) for f in folders]
    shown = ", ".join(roots) or "(no folder configured)"
    where = f"{label} ({shown})" if label else shown
    missing = LoraFileError(f"{what} {name!r} is not a file in {where}. Copy it there (subfolders are fine) "
                            f"or fix the name.")
    if not isinstance(name, str) or not name.strip() or _BAD_CHARS.search(name):
        raise missing
    text = name.strip()
    candidates = []
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:[\\/]", text):
        path = os.path.normpath(text)
        candidates = [path] if any(_inside(path, root) for root in roots) else []
    else:
        try:
            relative = _clean_relative(text, what, shown)
        except LoraValueError:
            raise missing from None
        candidates = [os.path.normpath(os.path.join(root, relative)) for root in roots]
        candidates = [c for c, root in zip(candidates, roots) if _inside(c, root)]
    for path in candidates:
        if extensions is not None and not path.lower().endswith(tuple(e.lower() for e in extensions)):
            continue
        try:
            import stat

            if stat.S_ISREG(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    raise missing


def inside_any(path: str, folders: Sequence[str]) -> bool:
    """True when the absolute, normalised `path` lies in one of `folders`."""
    path = os.path.normpath(os.path.abspath(path))
    return any(_inside(path, os.path.abspath(f)) for f in folders)
